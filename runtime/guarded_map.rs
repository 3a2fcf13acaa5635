//! A read-only memory map of a model file that survives the file being cut short underneath
//! it. Touching a page of a mapped file past its end raises SIGBUS, which would kill the
//! process: a model replaced in place (truncated, then rewritten) by an update while wae-edge
//! loads it is a real event on an unattended box. While a [`GuardedMap`] lives, a SIGBUS inside
//! it is answered by mapping zero pages over the rest of the region, so the read that faulted
//! goes on (and reads zeros), and the map is marked damaged; the loader then checks
//! [`GuardedMap::damaged`] after each copy and refuses the file. A SIGBUS anywhere else goes to
//! the handler that was there before, as if this one did not exist. (The same approach as
//! Sapling's indexedlog, which zero-fills pages that fail to read.)

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::Mmap;

/// Maps guarded at once, at most; more are mapped unguarded, as before.
const SLOTS: usize = 32;

/// A guarded region: its start and length (0: the slot is free), and whether a fault hit it.
struct Region {
    start: AtomicUsize,
    len: AtomicUsize,
    damaged: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Region = Region {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
};

static REGIONS: [Region; SLOTS] = [FREE; SLOTS];

/// A memory map whose truncation is an error, not a crash.
pub struct GuardedMap {
    /// The slot in [`REGIONS`], if one was free.
    slot: Option<usize>,
    map: Mmap,
}

impl GuardedMap {
    /// Maps `file` read-only and guards the mapping.
    pub fn new(file: &File) -> io::Result<GuardedMap> {
        // SAFETY: read-only; a file changed underneath is turned into `damaged` below rather
        // than a crash, and every copy out of the map is checked against it.
        let map = unsafe { Mmap::map(file) }?;
        let slot = if map.is_empty() {
            None
        } else {
            handler::install();
            claim(map.as_ptr() as usize, map.len())
        };
        Ok(GuardedMap { slot, map })
    }

    /// The mapped bytes. Read past a truncation, they are zeros; check [`Self::damaged`] after.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Whether the file shrank under the map and a read came back as zeros.
    pub fn damaged(&self) -> bool {
        self.slot
            .is_some_and(|s| REGIONS[s].damaged.load(Ordering::Acquire))
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Released before the map itself is unmapped (fields drop after this).
        if let Some(s) = self.slot {
            REGIONS[s].len.store(0, Ordering::Release);
            REGIONS[s].start.store(0, Ordering::Release);
        }
    }
}

/// Records a region in a free slot.
fn claim(start: usize, len: usize) -> Option<usize> {
    for (i, r) in REGIONS.iter().enumerate() {
        if r.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            r.damaged.store(false, Ordering::Release);
            r.len.store(len, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// The region holding `addr`, if any.
fn region_of(addr: usize) -> Option<&'static Region> {
    REGIONS.iter().find(|r| {
        let (start, len) = (
            r.start.load(Ordering::Acquire),
            r.len.load(Ordering::Acquire),
        );
        start != 0 && addr >= start && addr - start < len
    })
}

#[cfg(unix)]
mod handler {
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;

    /// The SIGBUS action before ours, restored for faults that are not ours.
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static PAGE: OnceLock<usize> = OnceLock::new();

    /// Installs the SIGBUS handler once per process.
    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let _ = PAGE.set(usize::try_from(page).unwrap_or(4096).max(1));
            // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
            // SA_SIGINFO signature; `previous` receives the old action before ours is live.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                    let _ = PREVIOUS.set(previous);
                }
            }
        });
    }

    /// The faulting address of a SIGBUS.
    ///
    /// # Safety
    /// `info` must be the siginfo the kernel passed to the handler.
    unsafe fn fault_address(info: *const libc::siginfo_t) -> usize {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: the caller passes the kernel's siginfo.
        return unsafe { (*info).si_addr() as usize };
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        // SAFETY: as above.
        return unsafe { (*info).si_addr as usize };
    }

    /// Async-signal-safe: atomics, `mmap` and `sigaction` only.
    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: called by the kernel with its siginfo.
        let addr = unsafe { fault_address(info) };
        if let (Some(r), Some(&page)) = (super::region_of(addr), PAGE.get()) {
            let start = r.start.load(Ordering::Acquire);
            let end = (start + r.len.load(Ordering::Acquire)).next_multiple_of(page);
            let from = addr - addr % page;
            // SAFETY: [from, end) lies inside a live mapping this module guards; replacing it
            // with private zero pages leaves it readable until the map is dropped (munmap of
            // the whole original range removes them too).
            let zeroed = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zeroed != libc::MAP_FAILED {
                r.damaged.store(true, Ordering::Release);
                return;
            }
        }
        // Not ours (or no way to recover): the previous action takes the repeated fault.
        if let Some(previous) = PREVIOUS.get() {
            // SAFETY: restoring an action the kernel handed us.
            unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
        }
    }
}

#[cfg(not(unix))]
mod handler {
    /// No SIGBUS outside Unix.
    pub fn install() {}
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file cut short after it was mapped reads as zeros past its new end, marks the map
    /// damaged, and does not kill the test process.
    #[test]
    fn truncation_is_reported_not_fatal() {
        let page = 4096 * 4;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; page * 8]).unwrap();
        f.flush().unwrap();
        let file = File::open(f.path()).unwrap();
        let map = GuardedMap::new(&file).unwrap();
        assert!(map.bytes().iter().take(page).all(|&b| b == 7));
        assert!(!map.damaged());
        f.as_file().set_len((page * 2) as u64).unwrap();
        let tail_sum: u64 = map.bytes()[page * 4..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail_sum, 0, "past the cut, zeros");
        assert!(map.damaged());
        // The slot is free again once the map is gone, and a new map starts undamaged.
        drop(map);
        let again = GuardedMap::new(&file).unwrap();
        assert!(!again.damaged());
        assert_eq!(again.bytes().len(), page * 2);
    }
}
