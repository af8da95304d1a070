"""The paged KV cache: host-side page allocator, device-side pool, page transfer."""
