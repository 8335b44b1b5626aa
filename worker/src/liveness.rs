//! Whether the engine thread still runs. The thread holds an [`ExitWatch`]; when it ends (by a
//! panic, or because its queue closed) the watch marks the engine dead, so `/health` and
//! `/ready` fail at once and the kubelet restarts the pod instead of the Service sending it
//! requests that all fail.

use std::sync::{Arc, Mutex};

/// Shared between the engine thread and every handle; cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Liveness(Arc<Mutex<Option<String>>>);

impl Liveness {
    /// Why the engine stopped, once it has.
    pub fn failure(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The guard the engine thread holds for as long as it runs.
    pub fn watch(&self) -> ExitWatch {
        ExitWatch(self.clone())
    }

    fn mark(&self, why: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned());
    }
}

/// Marks the engine dead when dropped, which the engine thread does as it ends.
pub struct ExitWatch(Liveness);

impl Drop for ExitWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; this worker is no longer healthy");
            self.0.mark("the engine thread panicked");
        } else {
            self.0.mark("the engine thread stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_panics_or_ends_marks_the_engine_dead() {
        let live = Liveness::default();
        let watch = live.watch();
        assert_eq!(live.failure(), None);
        let _ = std::thread::spawn(move || {
            let _watch = watch;
            panic!("boom");
        })
        .join();
        assert_eq!(
            live.failure().as_deref(),
            Some("the engine thread panicked")
        );

        let live = Liveness::default();
        drop(live.watch());
        assert_eq!(live.failure().as_deref(), Some("the engine thread stopped"));
    }
}
