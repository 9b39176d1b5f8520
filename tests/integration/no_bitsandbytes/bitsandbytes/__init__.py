# Put first on PYTHONPATH by tests: an image where bitsandbytes does not import.
raise ImportError("bitsandbytes is hidden by the test (tests/integration/no_bitsandbytes)")
