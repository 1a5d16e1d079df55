//! Small helpers for spawned tasks.

/// A task that is stopped when its handle is dropped (an early return of its owner).
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
