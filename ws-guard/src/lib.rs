//! ws-guard's userspace: configuration, loading and attaching the kernel programs, keeping the
//! accounting honest, and the daemon around them.
