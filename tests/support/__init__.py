"""Helpers shared by the test modules: processes, the micro preset's runs, parallel-layout commands and artifacts
shared by the xdist workers of one test run. Test modules import from here, never from each other."""
