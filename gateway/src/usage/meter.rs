//! The meter of one request: it travels with the request (and with the response body, by
//! value) and reports the finished [`RequestRecord`] to the usage worker exactly once, when it
//! is dropped — whatever way the request ends: a complete response, a backend failure, an
//! error, a client that disconnects mid-stream.

use crate::record::{Admitted, Observed, RequestRecord};
use crate::telemetry::RequestSpan;
use std::time::Instant;
use tokio::sync::mpsc;

/// What the usage worker receives: the record, and the request's span to end.
pub struct Finished {
    pub record: RequestRecord,
    pub span: Option<RequestSpan>,
}

/// Follows one request and reports it exactly once, on drop.
pub struct Meter {
    tx: mpsc::UnboundedSender<Finished>,
    /// Taken only in `drop`.
    admitted: Option<Admitted>,
    started: Instant,
    observed: Observed,
    span: Option<RequestSpan>,
}

impl Meter {
    pub fn new(
        tx: mpsc::UnboundedSender<Finished>,
        admitted: Admitted,
        span: Option<RequestSpan>,
    ) -> Meter {
        Meter {
            tx,
            started: admitted.started,
            admitted: Some(admitted),
            observed: Observed::default(),
            span,
        }
    }

    /// What proxying observed so far.
    pub fn observed(&mut self) -> &mut Observed {
        &mut self.observed
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(admitted) = self.admitted.take() {
            let record = RequestRecord {
                admitted,
                observed: std::mem::take(&mut self.observed),
                duration: self.started.elapsed(),
            };
            // The worker is gone only after shutdown's final flush; nothing left to settle then.
            let _ = self.tx.send(Finished {
                record,
                span: self.span.take(),
            });
        }
    }
}
