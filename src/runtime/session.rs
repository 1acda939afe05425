//! One framed session: what both ends of a master–slave connection read and write.
//!
//! This module owns the life of a connection once its transport is up: frames are
//! written by a task of the session's own (so a slow peer makes senders wait instead of
//! growing a queue), that task sends a [`Frame::Ping`] whenever it has been idle for
//! [`KEEPALIVE_EVERY`], and [`Session::recv`] reads and decodes the next frame within a
//! deadline, saying why when the frame was bad or the peer went silent.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runtime::protocol::{self, DecodeError, Frame};
use crate::runtime::transport::{
    FrameReader, FrameWriter, KEEPALIVE_EVERY, MAX_PAYLOAD, TransportError,
};

/// Frames queued per connection before senders wait (backpressure).
pub const OUTBOX: usize = 64;

/// Why a session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The transport failed (reset, too long a frame, a frame that did not decrypt...).
    #[error("connection error: {0}")]
    Transport(#[from] TransportError),
    /// The peer sent a frame that is not one of ours.
    #[error("malformed frame ({0}); closing the connection")]
    Malformed(#[from] DecodeError),
    /// Nothing came, not even a keepalive, for this long.
    #[error("silent for {0:?}: connection dead")]
    Silent(Duration),
    /// The session's writer stopped (the connection is gone).
    #[error("the connection's writer stopped")]
    Closed,
}

/// Both directions of one connection: frames in with [`Session::recv`], frames out with
/// [`Session::send`] (or a [`Session::sender`] handed to other tasks).
pub struct Session {
    reader: FrameReader,
    out: mpsc::Sender<Frame>,
    writer: JoinHandle<()>,
}

impl Session {
    /// Starts a session on an established connection: spawns its writer (which pings
    /// when idle), queueing at most [`OUTBOX`] frames.
    pub fn start(reader: FrameReader, writer: FrameWriter) -> Self {
        let (out, outbox) = mpsc::channel(OUTBOX);
        let writer = tokio::spawn(write_frames(writer, outbox));
        Self {
            reader,
            out,
            writer,
        }
    }

    /// The next frame, waiting at most `deadline` for it (keepalives included, so a
    /// live peer is never silent that long); `None` when the peer closed cleanly.
    pub async fn recv(&mut self, deadline: Duration) -> Result<Option<Frame>, SessionError> {
        match tokio::time::timeout(deadline, self.reader.read()).await {
            Ok(Ok(Some(bytes))) => Ok(Some(protocol::decode(&bytes)?)),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => Err(SessionError::Silent(deadline)),
        }
    }

    /// Queues `frame`, waiting while the outbox is full.
    pub async fn send(&self, frame: Frame) -> Result<(), SessionError> {
        self.out.send(frame).await.map_err(|_| SessionError::Closed)
    }

    /// A handle that queues frames on this session, for other tasks.
    pub fn sender(&self) -> mpsc::Sender<Frame> {
        self.out.clone()
    }

    /// Stops sending from this handle and gives what is queued up to `grace` to leave
    /// (other senders may still hold the outbox open); the writer is then left to end
    /// on its own.
    pub async fn close(self, grace: Duration) {
        drop(self.out);
        let _ = tokio::time::timeout(grace, self.writer).await;
    }

    /// Stops the writer now, dropping whatever is still queued.
    pub fn abort(self) {
        self.writer.abort();
    }
}

/// Writes queued frames, flushing when the queue is empty; pings when idle.
///
/// The keepalive is this task's own timer, so it must get to run: every task that
/// moves bulk data on a runtime (this writer, the master's reader, output consumers)
/// yields after each chunk. On a single-threaded runtime, a task that stays busy
/// across many chunks would otherwise delay timers (and so pings) by seconds, and the
/// peer would call the connection dead.
async fn write_frames(mut writer: FrameWriter, mut outbox: mpsc::Receiver<Frame>) {
    loop {
        let frame = match tokio::time::timeout(KEEPALIVE_EVERY, outbox.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => Frame::Ping,
        };
        for payload in protocol::encode_split(frame, MAX_PAYLOAD) {
            if let Err(err) = writer.write(&payload).await {
                tracing::debug!(%err, "writing a frame failed");
                return;
            }
        }
        if outbox.is_empty() && writer.flush().await.is_err() {
            return;
        }
        // Let the runtime's timers and other connections run between frames.
        tokio::task::yield_now().await;
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::transport;
    use tokio::net::TcpListener;

    type Halves = (transport::FrameReader, transport::FrameWriter);

    /// Both ends of a plain loopback connection: (server, client).
    async fn connection() -> (Halves, Halves) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            transport::accept(stream, None).await.unwrap()
        });
        let client = transport::connect(addr, None).await.unwrap();
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn frames_cross_and_an_idle_session_keeps_itself_alive() {
        let ((sr, sw), (cr, cw)) = connection().await;
        let (mut server, client) = (Session::start(sr, sw), Session::start(cr, cw));
        client.send(Frame::Terminate).await.unwrap();
        assert_eq!(
            server.recv(Duration::from_secs(5)).await.unwrap(),
            Some(Frame::Terminate)
        );
        // Nothing to say for a while: the client's own timer pings.
        assert_eq!(
            server.recv(KEEPALIVE_EVERY * 4).await.unwrap(),
            Some(Frame::Ping)
        );
        client.close(Duration::from_secs(1)).await;
        assert_eq!(server.recv(Duration::from_secs(5)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_bad_frame_says_why_and_silence_is_reported() {
        let ((sr, sw), (_cr, mut cw)) = connection().await;
        let mut server = Session::start(sr, sw);
        cw.write(br#"{"t":"call","id":1}"#).await.unwrap();
        cw.flush().await.unwrap();
        let err = server.recv(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, SessionError::Malformed(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("malformed frame (") && text.contains("missing field `name`"),
            "{text}"
        );
        // The raw client never pings.
        let err = server.recv(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, SessionError::Silent(_)), "{err}");
        assert!(err.to_string().contains("connection dead"), "{err}");
    }
}
