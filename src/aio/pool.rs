//! A fixed pool of threads that run blocking jobs. Jobs report their own completion (they own
//! whatever they need to), so the pool knows nothing about what they do.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::warn;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads fed from one channel. Dropping the pool lets the workers finish the jobs
/// already queued, then joins them.
pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// A pool of `threads` workers (at least one). A worker that cannot be spawned is logged;
    /// the pool fails only when none can.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            match std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&rx))
            {
                Ok(h) => workers.push(h),
                Err(e) if !workers.is_empty() => {
                    warn!("thread pool: only {i} workers ({e})");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Arc::new(Pool {
            tx: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
        }))
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Queue a job. Returns it back when the pool is shut down.
    pub fn spawn(&self, job: Box<dyn FnOnce() + Send + 'static>) -> Result<(), Job> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        match job {
            // Jobs catch their own panics (the request layer does); one that escapes ends only
            // this job, not the worker.
            Ok(job) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    warn!("a pool job panicked");
                }
            }
            Err(_) => return,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_survives_a_panic() {
        let pool = Pool::new(3, "t").unwrap();
        assert_eq!(pool.threads(), 3);
        let n = Arc::new(AtomicUsize::new(0));
        assert!(pool.spawn(Box::new(|| panic!("job panics"))).is_ok());
        for _ in 0..100 {
            let n = n.clone();
            let job = Box::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
            });
            assert!(pool.spawn(job).is_ok());
        }
        drop(pool);
        assert_eq!(n.load(Ordering::SeqCst), 100);
    }
}
