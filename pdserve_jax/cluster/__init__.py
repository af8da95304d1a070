"""Instances as processes of their own: the router's executor (`router`), the worker
process (`worker`), the wire format of their control channel (`wire`).

The router runs the engine loop, the coordinator and every scheduler and page
allocator; a worker holds one instance's devices, weights, pool and programs.
"""
