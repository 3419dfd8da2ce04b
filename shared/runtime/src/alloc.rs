//! Every Tandem process allocates with mimalloc, declared here once for every binary that
//! links this crate.
//!
//! Why not the C library's allocator: under load a Read API request allocates and frees a few
//! dozen small buffers (headers, the path, the key, the response), and glibc's allocator took a
//! fifth of the Read API's CPU for them on two cores, much of it in contention for its arena
//! lock (a futex wait and wake-up per collision). mimalloc keeps a heap per thread and frees
//! across threads without a lock. The figures are in docs/benchmarks.md ("The allocator").

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
