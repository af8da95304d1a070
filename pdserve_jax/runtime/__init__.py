"""Jitted prefill and decode programs bound to one mesh, their shape buckets and
in-program sampling."""
