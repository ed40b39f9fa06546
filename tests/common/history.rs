//! Recording client histories for `spindle::lincheck`: a shared recorder with one clock, and
//! gRPC calls to cluster members with a deadline that say whether a failed call could have
//! taken effect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use spindle::bench::client::Client;
use spindle::lincheck::{ClientId, History, Op, OpId, Outcome, Violation};
use spindle::server::grpc::Status;

/// A [`History`] shared by client tasks and threads, timed from one origin. The invocation time
/// is taken before the request is sent and the completion time after the answer arrived, so
/// every recorded interval contains the real one.
#[derive(Clone)]
pub struct Recorder {
    origin: Instant,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    history: History,
    /// What the test knows about an operation beyond the history (which member served it),
    /// shown with a violation.
    notes: HashMap<OpId, String>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            origin: Instant::now(),
            inner: Arc::default(),
        }
    }

    /// Nanoseconds since the origin.
    pub fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A client that panicked left nothing half-recorded: every record is one call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn invoke(&self, client: ClientId, op: Op) -> OpId {
        let t = self.now();
        self.lock().history.invoke(client, op, t)
    }

    pub fn complete(&self, id: OpId, outcome: Outcome) {
        let t = self.now();
        if let Err(e) = self.lock().history.complete(id, outcome, t) {
            panic!("recording: {e}");
        }
    }

    /// Attaches `note` to operation `id` (appended to any earlier note).
    pub fn note(&self, id: OpId, note: impl Into<String>) {
        let mut inner = self.lock();
        let n = inner.notes.entry(id).or_default();
        if !n.is_empty() {
            n.push_str("; ");
        }
        n.push_str(&note.into());
    }

    pub fn history(&self) -> History {
        self.lock().history.clone()
    }

    /// `v` with the notes of the operations it names.
    pub fn explain(&self, v: &Violation) -> String {
        let inner = self.lock();
        let mut out = v.to_string();
        for id in &v.ops {
            if let Some(n) = inner.notes.get(id) {
                out.push_str(&format!("\n  #{id}: {n}"));
            }
        }
        out
    }
}

/// Why a call to a member returned no answer.
#[derive(Debug)]
pub enum CallError {
    /// No connection could be made: the request was never sent, so it did not take effect.
    NotSent(String),
    /// The server answered with an error. A write may still have taken effect (e.g. a
    /// forwarded write whose answer was lost), so for writes this is indeterminate.
    Status(Status),
    /// No answer within the deadline, or the connection broke: indeterminate.
    Lost(String),
}

impl CallError {
    /// The outcome to record for a write that got this error.
    pub fn write_outcome(&self) -> Outcome {
        match self {
            CallError::NotSent(_) => Outcome::Failed,
            CallError::Status(_) | CallError::Lost(_) => Outcome::Unknown,
        }
    }
}

/// One HTTP/2 connection per member (`host:port` endpoints), made on first use and dropped
/// after a broken or timed-out call so that the next call reconnects. Runs on a glommio
/// executor.
pub struct Members {
    endpoints: Vec<String>,
    conns: Vec<Option<Client>>,
    /// Deadline of every call (connecting included).
    pub deadline: Duration,
}

impl Members {
    pub fn new(endpoints: &[String], deadline: Duration) -> Members {
        Members {
            endpoints: endpoints.to_vec(),
            conns: vec![None; endpoints.len()],
            deadline,
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    async fn client(&mut self, member: usize) -> Result<Client, CallError> {
        if let Some(c) = &self.conns[member] {
            return Ok(c.clone());
        }
        let ep = self.endpoints[member].clone();
        let c = within(self.deadline, Client::connect(&ep))
            .await
            .ok_or_else(|| CallError::NotSent(format!("connect {ep}: timed out")))?
            .map_err(CallError::NotSent)?;
        self.conns[member] = Some(c.clone());
        Ok(c)
    }

    /// A unary call to `member`.
    pub async fn unary<Req, Resp>(
        &mut self,
        member: usize,
        path: &str,
        req: &Req,
    ) -> Result<Resp, CallError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let mut c = self.client(member).await?;
        match within(self.deadline, c.unary(path, req)).await {
            Some(Ok(r)) => Ok(r),
            Some(Err(s)) if is_transport(&s) => {
                self.conns[member] = None;
                Err(CallError::Lost(s.message))
            }
            Some(Err(s)) => Err(CallError::Status(s)),
            None => {
                self.conns[member] = None;
                Err(CallError::Lost(format!("no answer in {:?}", self.deadline)))
            }
        }
    }
}

/// The errors the client makes up itself for a connection that failed (see `bench::client`).
fn is_transport(s: &Status) -> bool {
    ["connection:", "request:", "response:"]
        .iter()
        .any(|p| s.message.starts_with(p))
}

/// `f`'s output, or `None` if it takes longer than `d`.
pub async fn within<T>(d: Duration, f: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(d).await;
        None
    })
    .await
}
