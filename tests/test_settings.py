"""settings: the typed settings object and the rate-limited warning."""

from __future__ import annotations

import logging

import pytest

from settings import LimitedLog, get_settings


def test_settings_name_the_bad_variable() -> None:
    with pytest.raises(ValueError, match="ZSS_URL_ALLOW_NETWORKS='10.0.0.0/33'"):
        get_settings({"ZSS_URL_ALLOW_NETWORKS": "10.0.0.0/33"})
    assert get_settings({"ZSS_URL_ALLOW_NETWORKS": "10.1.2.0/24, 192.168.1.7"}).url_allow_networks


def test_redis_settings() -> None:
    assert get_settings({}).redis_url == ""  # the default: state on this machine only
    assert get_settings({"ZSS_REDIS_URL": " redis://h:6379/0 "}).redis_url == "redis://h:6379/0"
    with pytest.raises(ValueError, match="ZSS_REDIS_URL='h:6379'"):
        get_settings({"ZSS_REDIS_URL": "h:6379"})
    with pytest.raises(ValueError, match="ZSS_REDIS_TIMEOUT_S='0'"):
        get_settings({"ZSS_REDIS_TIMEOUT_S": "0"})


def test_limited_log_logs_once_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = LimitedLog(logging.getLogger("zss.test"), interval_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="zss.test"):
        assert limited.warning("shed %d", 1) is True
        assert [limited.warning("shed %d", i) for i in range(2, 5)] == [False, False, False]
        now[0] += 5.0
        assert limited.warning("shed %d", 5) is True
    assert [r.getMessage() for r in caplog.records] == ["shed 1", "shed 5 (and 3 more in the last 5 s)"]
