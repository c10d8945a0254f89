"""The ``[plugins.mta_sts]`` section and the ``mta_sts`` connector setting, validated by the core's loader."""

from __future__ import annotations

from typing import Any

import pytest

from mxgate.core.config import build_config
from mxgate.core.errors import ConfigError
from mxgate.core.settings import ConfigRegistry
from mxgate.plugins.mta_sts import MTA_STS_MODE, MtaStsConfig, MtaStsPlugin, ServedPolicy


def _registry() -> ConfigRegistry:
    registry = ConfigRegistry()
    MtaStsPlugin().mxgate_lifecycle_register_config(registry)
    return registry


def _doc(section: dict[str, Any], mode: str = "mandatory") -> dict[str, Any]:
    return {
        "outbound_connector": [{"name": "internet", "recipient_domains": ["*"], "use_mx": True, "mta_sts": mode}],
        "plugins": {"mta_sts": section},
    }


def test_section_defaults_and_values() -> None:
    config = build_config(_doc({}), registry=_registry(), check_files=False)
    conf = config.plugin_section("mta_sts", MtaStsConfig)
    assert (conf.fetch_timeout, conf.fetch_port, conf.refresh_after, conf.serve_listen) == (10.0, 443, 86400.0, None)
    assert config.outbound_connector[0].get(MTA_STS_MODE) == "mandatory"
    config = build_config(
        _doc(
            {
                "ca_file": "ca.pem",
                "refresh_concurrency": 2,
                "serve_listen": "127.0.0.1:8443",
                "serve_policies": [{"domain": "example.org", "mx": ["mx.example.org", "*.mx.example.org"]}],
            }
        ),
        registry=_registry(),
        check_files=False,
    )
    conf = config.plugin_section("mta_sts", MtaStsConfig)
    (served,) = conf.serve_policies
    assert served == ServedPolicy(domain="example.org", mx=("mx.example.org", "*.mx.example.org"))
    assert (served.mode, served.max_age) == ("enforce", 604800)


@pytest.mark.parametrize(
    ("section", "mode", "path"),
    [
        ({"fetch_port": 0}, "opportunistic", "plugins.mta_sts.fetch_port"),
        ({"fetch_timeout": -1}, "opportunistic", "plugins.mta_sts.fetch_timeout"),
        ({"serve_listen": "nowhere"}, "opportunistic", "plugins.mta_sts.serve_listen"),
        ({"serve_policies": [{"domain": "a.org", "mx": ["a..b"]}]}, "opportunistic", "serve_policies[0].mx"),
        ({"serve_policies": [{"domain": "a.org", "max_age": 31557601}]}, "opportunistic", "serve_policies[0].max_age"),
        ({"serve_policies": [{"domain": "a.org", "id": "x" * 33}]}, "opportunistic", "serve_policies[0].id"),
        ({"serve_policies": [{"domain": "a.org", "mode": "strict"}]}, "opportunistic", "serve_policies[0].mode"),
        ({"refersh_after": 1}, "opportunistic", "plugins.mta_sts.refersh_after"),
        ({}, "always", "outbound_connector[0].mta_sts"),
    ],
)
def test_section_errors_name_the_key(section: dict[str, Any], mode: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(_doc(section, mode), registry=_registry(), check_files=False)
    assert any(path in str(p) for p in info.value.problems), [str(p) for p in info.value.problems]
