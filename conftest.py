"""Repository-wide pytest hooks: only the shared cluster fixtures of tests/controlplane/fixtures.py
(lazy: a unit-test session starts nothing). Tier fixtures live in tests/integration and e2e."""

pytest_plugins = ["tests.controlplane.fixtures"]
