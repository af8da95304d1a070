"""The paged KV cache on devices: the pool and the page transfer between meshes (the
host-side page bookkeeping is `core.pages`)."""
