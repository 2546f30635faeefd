"""On PYTHONPATH, hides an installed pysimdjson from a server process the
tests start, to check the server without it (it is optional)."""
raise ImportError("simdjson is hidden by the tests (tests/no_simdjson)")
