"""Cluster schema steps: what ``mxgate_lifecycle_register_migrations`` implementations declare (numbered SQL
steps per component); :mod:`mxgate.core.cluster` applies them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Migration", "MigrationRegistry"]


@dataclass(frozen=True, slots=True)
class Migration:
    component: str
    version: int
    description: str
    sql: str


@dataclass
class MigrationRegistry:
    """Numbered schema steps per component (hook ``mxgate_lifecycle_register_migrations``)."""

    steps: dict[str, list[Migration]] = field(default_factory=dict)

    def add(self, component: str, version: int, description: str, sql: str) -> None:
        steps = self.steps.setdefault(component, [])
        if any(m.version == version for m in steps):
            raise ValueError(f"cluster schema step {component} {version} declared twice")
        steps.append(Migration(component, version, description, sql))
        steps.sort(key=lambda m: m.version)
        if [m.version for m in steps] != list(range(1, len(steps) + 1)):
            raise ValueError(f"cluster schema steps of {component} must be numbered 1, 2, 3 ... without gaps")

    def wanted(self) -> dict[str, int]:
        return {component: steps[-1].version for component, steps in self.steps.items() if steps}
