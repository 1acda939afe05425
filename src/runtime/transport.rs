//! Node transport: framed TCP connections between nodes, encrypted with a cluster key.
//!
//! This module owns the bytes of a node-to-node connection:
//! - a preamble (`LNET1\n` and `P` for plain or `N` for Noise) that the listener answers
//!   with one status byte, so a client without the key (or with one where none is
//!   used) gets a clear error before anything else happens; a listener serving all the
//!   connections it may sends the status "busy" at once, without waiting for the
//!   preamble, and closes ([`refuse_busy`]);
//! - with a key, a Noise `NNpsk0_25519_ChaChaPoly_BLAKE2s` handshake whose pre-shared key
//!   is derived from the cluster key: both sides prove they hold it, and every frame
//!   after it is encrypted and authenticated;
//! - frames: a 4-byte big-endian length, then at most [`MAX_FRAME`] bytes. A frame that
//!   is too long, or fails to decrypt, ends that connection only.
//!
//! Keepalive timing ([`KEEPALIVE_EVERY`], [`DEAD_AFTER`]) is defined here and applied by
//! the sessions that use connections.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use snow::{StatelessTransportState, params::NoiseParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::key::ClusterKey;

/// Longest frame on the wire (the Noise message limit).
pub const MAX_FRAME: usize = 65_535;
/// Noise's authentication tag.
const TAG: usize = 16;
/// Longest payload a frame carries.
pub const MAX_PAYLOAD: usize = MAX_FRAME - TAG;
/// How often a session sends a keepalive when it has nothing else to say.
pub const KEEPALIVE_EVERY: Duration = Duration::from_millis(500);
/// A connection that has been silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(2);
/// The longest a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const PREAMBLE: &[u8; 6] = b"LNET1\n";
const PLAIN: u8 = b'P';
const NOISE: u8 = b'N';
const OK: u8 = 0;
const KEY_REQUIRED: u8 = 1;
const NO_KEY_HERE: u8 = 2;
const BUSY: u8 = 3;
const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"localnet/1 transport";

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    /// An I/O error on the connection.
    Io(#[from] io::Error),
    #[error("the node requires the cluster key; pass --key-file with the cluster's key")]
    /// The node requires the cluster key, and none was given.
    KeyRequired,
    #[error(
        "the node runs an open cluster without a key; connect without --key-file, or give the node the key"
    )]
    /// A key was given, but the node runs an open cluster.
    NoKeyExpected,
    #[error(
        "the slave refused the connection: too many connections are open to it; try again when some have closed"
    )]
    /// The slave has too many connections open and refused this one.
    Busy,
    #[error("the peer is not a localnet node (bad preamble)")]
    /// The peer did not send localnet's preamble: not a localnet node.
    BadPreamble,
    #[error("handshake failed: the cluster key does not match the node's")]
    /// The Noise handshake failed: the cluster keys differ.
    Handshake,
    #[error("handshake timed out")]
    /// The handshake did not finish in time.
    HandshakeTimeout,
    #[error("frame of {0} bytes is over the {MAX_FRAME} byte limit")]
    /// A frame's length (held, in bytes) is over [`MAX_FRAME`].
    FrameTooLarge(usize),
    #[error("a frame failed authentication")]
    /// A frame did not decrypt: it was corrupted or forged.
    Decrypt,
}

/// The reading half of a connection.
pub struct FrameReader {
    inner: BufReader<OwnedReadHalf>,
    cipher: Option<Arc<StatelessTransportState>>,
    nonce: u64,
    buf: Vec<u8>,
}

/// The writing half of a connection.
pub struct FrameWriter {
    inner: BufWriter<OwnedWriteHalf>,
    cipher: Option<Arc<StatelessTransportState>>,
    nonce: u64,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Reads the next frame's payload; `None` when the peer closed the connection cleanly.
    pub async fn read(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(TransportError::FrameTooLarge(len));
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).await?;
        match &self.cipher {
            None => Ok(Some(std::mem::take(&mut self.buf))),
            Some(cipher) => {
                let mut plain = vec![0u8; len];
                let n = cipher
                    .read_message(self.nonce, &self.buf, &mut plain)
                    .map_err(|_| TransportError::Decrypt)?;
                self.nonce += 1;
                plain.truncate(n);
                Ok(Some(plain))
            }
        }
    }
}

impl FrameWriter {
    /// Queues one frame (call [`FrameWriter::flush`] to push it out).
    pub async fn write(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(TransportError::FrameTooLarge(payload.len()));
        }
        let bytes: &[u8] = match &self.cipher {
            None => payload,
            Some(cipher) => {
                self.buf.resize(payload.len() + TAG, 0);
                let n = cipher
                    .write_message(self.nonce, payload, &mut self.buf)
                    .map_err(|_| TransportError::FrameTooLarge(payload.len()))?;
                self.nonce += 1;
                &self.buf[..n]
            }
        };
        self.inner
            .write_all(&(bytes.len() as u32).to_be_bytes())
            .await?;
        self.inner.write_all(bytes).await?;
        Ok(())
    }

    /// Sends what was queued.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// Closes the writing side.
    pub async fn shutdown(&mut self) -> Result<(), TransportError> {
        self.inner.flush().await?;
        self.inner.get_mut().shutdown().await?;
        Ok(())
    }
}

fn noise_params() -> NoiseParams {
    NOISE_PATTERN.parse().expect("a valid Noise pattern name")
}

fn psk(key: &ClusterKey) -> [u8; 32] {
    // A key of its own for the transport, derived from the cluster key.
    key.sign(&[b"localnet/1 transport psk"])
}

async fn read_raw(stream: &mut TcpStream) -> Result<Vec<u8>, TransportError> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => TransportError::Handshake,
            _ => e.into(),
        })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(TransportError::FrameTooLarge(len));
    }
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => TransportError::Handshake,
            _ => e.into(),
        })?;
    Ok(buf)
}

/// NNpsk0: the initiator sends its ephemeral key, the responder answers with its own;
/// each message is bound to the pre-shared key, so a wrong key fails the handshake.
/// This is one side's state before its first message.
fn noise_handshake(
    key: &ClusterKey,
    initiator: bool,
) -> Result<snow::HandshakeState, TransportError> {
    let psk = psk(key);
    let builder = snow::Builder::new(noise_params())
        .prologue(PROLOGUE)
        .and_then(|b| b.psk(0, &psk));
    match initiator {
        true => builder.and_then(|b| b.build_initiator()),
        false => builder.and_then(|b| b.build_responder()),
    }
    .map_err(|_| TransportError::Handshake)
}

/// Appends the handshake's next message to `out`, length-prefixed.
fn push_handshake_message(
    hs: &mut snow::HandshakeState,
    out: &mut Vec<u8>,
) -> Result<(), TransportError> {
    let mut buf = [0u8; 256];
    let n = hs
        .write_message(&[], &mut buf)
        .map_err(|_| TransportError::Handshake)?;
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.extend_from_slice(&buf[..n]);
    Ok(())
}

/// Reads the peer's handshake message into `hs`.
async fn read_handshake_message(
    stream: &mut TcpStream,
    hs: &mut snow::HandshakeState,
) -> Result<(), TransportError> {
    let message = read_raw(stream).await?;
    let mut buf = vec![0u8; message.len()];
    hs.read_message(&message, &mut buf)
        .map_err(|_| TransportError::Handshake)?;
    Ok(())
}

/// Says `status` (a refusal) and closes without resetting the connection: the client
/// may have sent its first handshake message already, and closing with it unread would
/// reset the connection, which can lose the status before the client reads it. So this
/// closes the writing side and reads until the client closes (bounded in time).
async fn refuse(stream: &mut TcpStream, status: u8) {
    if stream.write_all(&[status]).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut unread = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = stream.read(&mut unread).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn split(stream: TcpStream, cipher: Option<StatelessTransportState>) -> (FrameReader, FrameWriter) {
    let _ = stream.set_nodelay(true);
    let cipher = cipher.map(Arc::new);
    let (read, write) = stream.into_split();
    (
        FrameReader {
            inner: BufReader::with_capacity(128 * 1024, read),
            cipher: cipher.clone(),
            nonce: 0,
            buf: Vec::new(),
        },
        FrameWriter {
            inner: BufWriter::with_capacity(128 * 1024, write),
            cipher,
            nonce: 0,
            buf: Vec::new(),
        },
    )
}

/// Connects to a node and runs the handshake: the preamble and (with a key) the first
/// Noise message go out in one segment, and the slave answers its status and the second
/// message in one, so a keyed connection is ready after one round trip. Gives up after
/// [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    addr: std::net::SocketAddr,
    key: Option<&ClusterKey>,
) -> Result<(FrameReader, FrameWriter), TransportError> {
    connect_within(addr, key, HANDSHAKE_TIMEOUT).await
}

/// [`connect`], giving up after `timeout` (connection and handshake together).
pub async fn connect_within(
    addr: std::net::SocketAddr,
    key: Option<&ClusterKey>,
    timeout: Duration,
) -> Result<(FrameReader, FrameWriter), TransportError> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr).await?;
        // Small request/answer messages: send each at once.
        let _ = stream.set_nodelay(true);
        let mut hs = key.map(|k| noise_handshake(k, true)).transpose()?;
        let mut hello = PREAMBLE.to_vec();
        hello.push(if key.is_some() { NOISE } else { PLAIN });
        if let Some(hs) = hs.as_mut() {
            push_handshake_message(hs, &mut hello)?;
        }
        stream.write_all(&hello).await?;
        let mut status = [0u8; 1];
        stream
            .read_exact(&mut status)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => TransportError::BadPreamble,
                _ => e.into(),
            })?;
        match status[0] {
            OK => {}
            KEY_REQUIRED => return Err(TransportError::KeyRequired),
            NO_KEY_HERE => return Err(TransportError::NoKeyExpected),
            BUSY => return Err(TransportError::Busy),
            _ => return Err(TransportError::BadPreamble),
        }
        let Some(mut hs) = hs else {
            return Ok(split(stream, None));
        };
        read_handshake_message(&mut stream, &mut hs).await?;
        let cipher = hs
            .into_stateless_transport_mode()
            .map_err(|_| TransportError::Handshake)?;
        Ok(split(stream, Some(cipher)))
    })
    .await
    .map_err(|_| TransportError::HandshakeTimeout)?
}

/// Refuses an accepted connection because the listener serves all the connections it
/// may: sends the status "busy" (the client's [`connect`] then fails with
/// [`TransportError::Busy`]) and closes, at once and without waiting for anything.
pub fn refuse_busy(stream: TcpStream) {
    // A fresh socket's send buffer has room for one byte; if not, the client still
    // sees the connection close.
    let _ = stream.try_write(&[BUSY]);
    // Read what already came (the preamble, usually; a few KiB at most): closing with
    // unread bytes would reset the connection instead of closing it.
    let mut unread = [0u8; 1024];
    for _ in 0..4 {
        match stream.try_read(&mut unread) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
}

/// Runs the listener's side of the handshake on an accepted connection.
pub async fn accept(
    mut stream: TcpStream,
    key: Option<&ClusterKey>,
) -> Result<(FrameReader, FrameWriter), TransportError> {
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut hello = [0u8; 7];
        stream.read_exact(&mut hello).await?;
        if &hello[..6] != PREAMBLE {
            return Err(TransportError::BadPreamble);
        }
        match (hello[6], key) {
            (PLAIN, None) => {
                stream.write_all(&[OK]).await?;
                Ok(split(stream, None))
            }
            (NOISE, Some(key)) => {
                let mut hs = noise_handshake(key, false)?;
                if let Err(e) = read_handshake_message(&mut stream, &mut hs).await {
                    // The preamble was right; the handshake (another key) was not. The
                    // client then fails on the missing answer: a handshake error.
                    refuse(&mut stream, OK).await;
                    return Err(e);
                }
                let mut answer = vec![OK];
                push_handshake_message(&mut hs, &mut answer)?;
                stream.write_all(&answer).await?;
                let cipher = hs
                    .into_stateless_transport_mode()
                    .map_err(|_| TransportError::Handshake)?;
                Ok(split(stream, Some(cipher)))
            }
            (PLAIN, Some(_)) => {
                refuse(&mut stream, KEY_REQUIRED).await;
                Err(TransportError::KeyRequired)
            }
            (NOISE, None) => {
                refuse(&mut stream, NO_KEY_HERE).await;
                Err(TransportError::NoKeyExpected)
            }
            _ => Err(TransportError::BadPreamble),
        }
    })
    .await
    .map_err(|_| TransportError::HandshakeTimeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair(
        server_key: Option<ClusterKey>,
        client_key: Option<ClusterKey>,
    ) -> (
        Result<(FrameReader, FrameWriter), TransportError>,
        Result<(FrameReader, FrameWriter), TransportError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, server_key.as_ref()).await
        });
        let client = connect(addr, client_key.as_ref()).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn frames_round_trip_plain_and_encrypted() {
        for key in [None, Some(ClusterKey::from_bytes([4; 32]))] {
            let (server, client) = pair(key.clone(), key.clone()).await;
            let (mut sr, mut sw) = server.unwrap();
            let (mut cr, mut cw) = client.unwrap();
            for size in [0, 1, 1000, MAX_PAYLOAD] {
                let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
                cw.write(&payload).await.unwrap();
                cw.flush().await.unwrap();
                assert_eq!(sr.read().await.unwrap().unwrap(), payload);
                sw.write(&payload).await.unwrap();
                sw.flush().await.unwrap();
                assert_eq!(cr.read().await.unwrap().unwrap(), payload);
            }
            assert!(matches!(
                cw.write(&vec![0; MAX_PAYLOAD + 1]).await,
                Err(TransportError::FrameTooLarge(_))
            ));
            cw.shutdown().await.unwrap();
            assert!(sr.read().await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn key_mismatches_are_refused_with_clear_errors() {
        let k1 = ClusterKey::from_bytes([1; 32]);
        let k2 = ClusterKey::from_bytes([2; 32]);
        let (server, client) = pair(Some(k1.clone()), None).await;
        assert!(matches!(server, Err(TransportError::KeyRequired)));
        assert!(matches!(client, Err(TransportError::KeyRequired)));
        let (server, client) = pair(None, Some(k1.clone())).await;
        assert!(matches!(server, Err(TransportError::NoKeyExpected)));
        assert!(matches!(client, Err(TransportError::NoKeyExpected)));
        let (server, client) = pair(Some(k1), Some(k2)).await;
        assert!(matches!(server, Err(TransportError::Handshake)));
        assert!(
            matches!(client, Err(TransportError::Handshake)),
            "{:?}",
            client.err()
        );
    }

    #[tokio::test]
    async fn a_busy_listener_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            refuse_busy(stream);
        });
        let client = connect(addr, None).await;
        server.await.unwrap();
        assert!(
            matches!(client, Err(TransportError::Busy)),
            "{:?}",
            client.err()
        );
        let text = TransportError::Busy.to_string();
        assert!(text.contains("too many connections"), "{text}");
    }

    #[tokio::test]
    async fn oversized_frame_ends_the_connection() {
        let (server, client) = pair(None, None).await;
        let (mut sr, _sw) = server.unwrap();
        let (_cr, mut cw) = client.unwrap();
        cw.inner
            .write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        cw.flush().await.unwrap();
        assert!(matches!(
            sr.read().await,
            Err(TransportError::FrameTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn tampered_ciphertext_fails() {
        let key = ClusterKey::from_bytes([4; 32]);
        let (server, client) = pair(Some(key.clone()), Some(key)).await;
        let (mut sr, _sw) = server.unwrap();
        let (_cr, mut cw) = client.unwrap();
        // A well-framed but forged frame.
        cw.inner.write_all(&20u32.to_be_bytes()).await.unwrap();
        cw.inner.write_all(&[7u8; 20]).await.unwrap();
        cw.flush().await.unwrap();
        assert!(matches!(sr.read().await, Err(TransportError::Decrypt)));
    }
}
