"""HTTP APIs: admin routes (unix socket; the web listener mounts the same router), error table."""
