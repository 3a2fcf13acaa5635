//! The worker threads: one global rayon pool for the CPU engine and candle, set up once with
//! a checked size. Left to itself, rayon builds its pool on first use from `RAYON_NUM_THREADS`
//! and panics when the OS refuses the threads; here an impossible request is an error instead.

/// The most threads wae-edge starts: far above the cores of any board it runs on, far below
/// what exhausts an OS's thread limit.
pub const MAX_THREADS: usize = 1024;

/// Why the thread pool cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// `RAYON_NUM_THREADS` is not a number.
    #[error("RAYON_NUM_THREADS={0:?} is not a number of threads")]
    BadEnv(String),
    /// More threads than [`MAX_THREADS`].
    #[error("{0} threads is more than the {MAX_THREADS} wae-edge starts at most")]
    TooMany(usize),
    /// The OS refused to start them.
    #[error("cannot start {threads} worker threads: {reason}")]
    Spawn {
        /// Threads asked for.
        threads: usize,
        /// rayon's report.
        reason: String,
    },
}

/// Starts the global pool with `requested` threads, else `RAYON_NUM_THREADS`, else one per
/// core, and returns its size. The first call decides; later calls return the pool's size.
pub fn init(requested: Option<usize>) -> Result<usize, ThreadsError> {
    static POOL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(&n) = POOL.get() {
        return Ok(n);
    }
    let from_env = match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) => Some(
            v.trim()
                .parse::<usize>()
                .map_err(|_| ThreadsError::BadEnv(v.clone()))?,
        ),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(ThreadsError::BadEnv(v.to_string_lossy().into_owned()))
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = requested.or(from_env).filter(|&n| n > 0).unwrap_or(cores);
    if n > MAX_THREADS {
        return Err(ThreadsError::TooMany(n));
    }
    // candle sizes its own work from the same variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let n = match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        Ok(()) => n,
        // Only an OS error has a source; without one, the pool existed already (a library
        // caller built it): keep it.
        Err(e) if std::error::Error::source(&e).is_none() => rayon::current_num_threads(),
        Err(e) => {
            return Err(ThreadsError::Spawn {
                threads: n,
                reason: e.to_string(),
            })
        }
    };
    Ok(*POOL.get_or_init(|| n))
}
