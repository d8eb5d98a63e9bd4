"""Helpers for tests and benchmarks, not for models: a pool of local gloo processes that runs a
function on P ranks and reports every rank's failure (`local_pool`)."""
