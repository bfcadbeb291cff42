"""The shared name registry behind filters, advantage estimators and loss aggregations."""
import pytest

from rpt_jax.registry import Registry


def test_register_get_and_read_only_mapping():
  r = Registry("widget", "register_widget")
  r.register("a")(len)
  assert r.get("a") is len and r["a"] is len and "a" in r and sorted(r) == ["a"] and len(r) == 1
  with pytest.raises(ValueError, match="widget 'a' is already registered"):
    r.register("a")(abs)
  with pytest.raises(ValueError, match=r"unknown widget 'b'; registered: \['a'\] .*register_widget"):
    r.get("b")
  with pytest.raises(TypeError):
    r["b"] = abs  # Only `register` adds entries.
