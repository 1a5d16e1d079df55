//! The process allocator: jemalloc, with one arena and dirty pages returned after a
//! second.
//!
//! A backfill allocates and frees a few dozen small strings per row (each customer record
//! is decoded, merged, re-encoded and dropped once per page it appears on), on three
//! threads at once (fetch, merge, commit). glibc's malloc spent a quarter of the CPU of
//! a 10k-row backfill in `_int_malloc`, `malloc_consolidate` and `free`; with jemalloc the
//! same backfill takes 36% less CPU. Its defaults (4 arenas per core, dirty pages kept
//! 10 s) cost 84 MiB at 100k rows against glibc's 58 MiB; one arena, with dirty pages
//! purged after 1 s and no muzzy stage, brings that to 50 MiB at the same speed
//! (bench/results/history.md, *Allocator*).
//!
//! The fetch task allocates most of a page's strings and the merge and the commit free
//! them, on other threads: each thread's cache of small objects keeps running empty on
//! one side and full on the other, and refills and flushes through the arena. Caches
//! four times as deep as the default (`lg_tcache_nslots_mul:3` for 1; up to jemalloc's
//! cap of 200 objects a size class) and collected every 256 KiB
//! allocated instead of 64 KiB (`tcache_gc_incr_bytes`) take 3.6% of the instructions
//! off a 10k backfill for 2 MiB of peak RSS (bench/results/history.md, *Eleventh round*).
//!
//! The library sets it, rather than each binary, so `leadsync`, `leadsync-bench` and the
//! tests all run on the allocator that ships. `_RJEM_MALLOC_CONF` in the environment
//! overrides these settings at start-up (jemalloc's own mechanism), e.g. for profiling.

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string pointer jemalloc reads once, at its first allocation.
#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a `'static` C string literal, never written.
#[cfg(not(target_env = "msvc"))]
unsafe impl Sync for MallocConf {}

/// jemalloc's `malloc_conf` (tikv-jemalloc-sys prefixes its symbols with `_rjem_`).
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
#[used]
pub static MALLOC_CONF: MallocConf =
    MallocConf(c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,lg_tcache_nslots_mul:3,tcache_gc_incr_bytes:262144".as_ptr());

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    /// Reads a jemalloc option through `mallctl`.
    fn option<T: Copy + Default>(name: &str) -> T {
        let name = std::ffi::CString::new(name).unwrap();
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `value` and `len` describe a writable `T`, the size mallctl checks.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl({name:?})");
        value
    }

    #[test]
    fn jemalloc_runs_with_the_configured_options() {
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return; // overridden on purpose
        }
        // A Vec's buffer comes from the global allocator: jemalloc must have served it.
        let v = vec![0u8; 4096];
        // SAFETY: `v`'s buffer is a live allocation of the global allocator.
        assert!(unsafe { tikv_jemalloc_sys::malloc_usable_size(v.as_ptr().cast()) } >= 4096);
        assert_eq!(option::<u32>("opt.narenas"), 1);
        assert_eq!(option::<isize>("opt.dirty_decay_ms"), 1000);
        assert_eq!(option::<isize>("opt.muzzy_decay_ms"), 0);
        assert_eq!(option::<isize>("opt.lg_tcache_nslots_mul"), 3);
        assert_eq!(option::<usize>("opt.tcache_gc_incr_bytes"), 262_144);
    }
}
