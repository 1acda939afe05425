//! What masters and slaves say to each other.
//!
//! This module owns the session protocol carried in transport frames (one JSON
//! [`Frame`] per transport frame), node ids (`nid://host:port`), how jobs end
//! ([`JobExit`]) and which stream their output came from ([`Stream`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A node's transport address, shown as `nid://host:port`.
///
/// ```
/// let nid: localnet::NodeId = "nid://127.0.0.1:8080".parse().unwrap();
/// assert_eq!(nid.to_string(), "nid://127.0.0.1:8080");
/// assert_eq!(nid.addr().port(), 8080);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct NodeId(SocketAddr);

impl NodeId {
    /// The node id of a transport address.
    pub fn new(addr: SocketAddr) -> Self {
        Self(addr)
    }
    /// The transport address.
    pub fn addr(&self) -> SocketAddr {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nid://{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("nid://").unwrap_or(s);
        rest.parse()
            .map(NodeId)
            .map_err(|_| format!("{s:?} is not a node id (nid://IP:PORT)"))
    }
}

impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for NodeId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Which output stream of a job a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
}

/// How a command job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobExit {
    /// Exit code, when the process exited.
    pub code: Option<i32>,
    /// Signal, when the process was killed by one.
    pub signal: Option<i32>,
    /// Killed because its timeout passed.
    pub timed_out: bool,
    /// Could not be run at all (refused, not found, ...).
    pub error: Option<String>,
    /// Not run because the slave does not run commands for this master: an open
    /// cluster's slave without `--insecure` (with [`JobExit::error`] saying so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// The connection to the slave was lost before the job's end was known (set by the
    /// master, never sent; the slave kills the jobs of a connection it loses).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

impl JobExit {
    /// A job that could not be run, or whose end is unknown, and why.
    ///
    /// ```
    /// let exit = localnet::JobExit::failed("empty command");
    /// assert!(!exit.success());
    /// assert_eq!(exit.describe(), "empty command");
    /// ```
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            code: None,
            signal: None,
            timed_out: false,
            error: Some(error.into()),
            refused: false,
            lost: false,
        }
    }

    /// A job whose connection was lost (see [`JobExit::lost`]).
    ///
    /// ```
    /// let exit = localnet::JobExit::connection_lost();
    /// assert!(exit.lost && !exit.success());
    /// assert_eq!(exit.describe(), "connection to the slave lost");
    /// ```
    pub fn connection_lost() -> Self {
        Self {
            lost: true,
            ..Self::failed("connection to the slave lost")
        }
    }

    /// A job the slave refused to run (see [`JobExit::refused`]), and why.
    ///
    /// ```
    /// let exit = localnet::JobExit::refusal("an open cluster");
    /// assert!(exit.refused && !exit.success());
    /// ```
    pub fn refusal(why: impl Into<String>) -> Self {
        Self {
            refused: true,
            ..Self::failed(why)
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.error.is_none() && !self.timed_out
    }

    /// A short description of a failure (`exit code 2`, `timed out`, ...).
    pub fn describe(&self) -> String {
        if let Some(e) = &self.error {
            e.clone()
        } else if self.timed_out {
            "timed out".into()
        } else if let Some(s) = self.signal {
            format!("killed by signal {s}")
        } else {
            format!("exit code {}", self.code.unwrap_or(-1))
        }
    }
}

/// One message of a master–slave session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Frame {
    /// Master → slave, first frame: who is asking.
    Hello {
        /// The master's name.
        name: String,
    },
    /// Slave → master, answer to `Hello`.
    Welcome {
        /// The slave's name.
        name: String,
        /// How many jobs the slave runs at once.
        slots: usize,
        /// The slave's tags.
        tags: BTreeMap<String, String>,
        /// What the slave does beyond the first protocol ([`FEATURES`]): a master
        /// sends `Input`, `PutFile` or `GetFile` only to a slave that names them (an
        /// older slave would call the frames malformed and close the connection).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Master → slave: call a registered function and answer with `Result`.
    Call {
        /// The request id, echoed in the `Result`.
        id: u64,
        /// The registered function's name.
        name: String,
        /// The function's argument.
        arg: Value,
    },
    /// Master → slave: run a command; answered with `Output` frames, then `Exit`.
    Exec {
        /// The job id, echoed in its `Output` and `Exit` frames.
        id: u64,
        /// The program and its arguments.
        argv: Vec<String>,
        /// Kill the command after this many milliseconds; none: no limit.
        timeout_ms: Option<u64>,
        /// The command's stdin comes in `Input` frames (ended by `InputEnd`); without
        /// it, stdin is `/dev/null`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stdin: bool,
    },
    /// Master → slave: bytes for the standard input of command `id` (started with
    /// `stdin`) or for file `id` (`PutFile`). The master sends at most
    /// [`INPUT_WINDOW`] of them before an `InputTaken` for each. On the wire it is
    /// binary, not JSON: byte `0x02`, the id (u64, little endian), then the bytes.
    Input {
        /// The `Exec`'s or `PutFile`'s id.
        id: u64,
        #[serde(with = "base64_field")]
        /// The bytes, at most [`INPUT_CHUNK`].
        data: Vec<u8>,
    },
    /// Master → slave: no more input for `id` (the command's stdin reaches its end;
    /// a file is complete, and must have this SHA-256).
    InputEnd {
        /// The `Exec`'s or `PutFile`'s id.
        id: u64,
        /// For a file: the SHA-256 of all its bytes, in hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// Slave → master: one `Input` frame of `id` was taken (written to the command's
    /// pipe or the file): the master may send one more.
    InputTaken {
        /// The `Exec`'s or `PutFile`'s id.
        id: u64,
    },
    /// Master → slave: write a file, whose bytes follow in `Input` frames and
    /// `InputEnd`; answered with a `Result` (`ok`: `{"path", "bytes", "sha256"}`).
    /// The slave writes a temporary file beside the target and renames it once the
    /// size and digest match, so a failed copy leaves the old file (or none).
    PutFile {
        /// The request id.
        id: u64,
        /// Where to write: an absolute path on the slave; a directory there (or, with
        /// `into_dir`, one that must be) gets `name` inside it.
        path: String,
        /// The file's own name (its last path component), for a directory target.
        name: String,
        /// The permission bits to give it (`mode & 0o7777`).
        mode: u32,
        /// How many bytes will come.
        size: u64,
        /// `path` must be a directory.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        into_dir: bool,
    },
    /// Master → slave: send a file: its bytes come in `Output` frames (stdout), then a
    /// `Result` (`ok`: `{"mode", "bytes", "sha256"}`).
    GetFile {
        /// The request id.
        id: u64,
        /// An absolute path on the slave, of a regular file.
        path: String,
    },
    /// Master → slave: kill a running call or command.
    Kill {
        /// The id of the call or command.
        id: u64,
    },
    /// Slave → master: the outcome of a `Call`.
    Result {
        /// The `Call`'s id.
        id: u64,
        /// The function's value, when it succeeded.
        ok: Option<Value>,
        /// The function's error, when it failed.
        err: Option<String>,
    },
    /// Slave → master: bytes a command wrote, exactly as written. On the wire it is
    /// binary, not JSON: byte `0x01`, the id (u64, little endian), the stream (0 stdout,
    /// 1 stderr), then the bytes. Its serde form (base64 data) is for logs and tools.
    Output {
        /// The `Exec`'s id.
        id: u64,
        /// Which stream the bytes came from.
        stream: Stream,
        #[serde(with = "base64_field")]
        /// The bytes.
        data: Vec<u8>,
    },
    /// Slave → master: a command ended.
    Exit {
        /// The `Exec`'s id.
        id: u64,
        /// How the command ended.
        exit: JobExit,
    },
    /// Master → slave: send your own log lines here (or stop).
    RedirectLogs {
        /// Whether to send log lines (`true`) or stop (`false`).
        on: bool,
    },
    /// Slave → master: the slave's own log lines.
    Log {
        /// The log lines, formatted.
        lines: Vec<String>,
    },
    /// Master → slave: kill your jobs, say goodbye and exit.
    Terminate,
    /// Slave → master: terminating.
    Terminating,
    /// Either way: I am alive.
    Ping,
}

/// The features a slave of this version names in its `Welcome`: `input` (a command's
/// stdin in `Input` frames) and `files` (`PutFile` and `GetFile`).
pub const FEATURES: [&str; 2] = [FEATURE_INPUT, FEATURE_FILES];
/// A command's stdin in `Input` frames.
pub const FEATURE_INPUT: &str = "input";
/// Files put on and fetched from the slave.
pub const FEATURE_FILES: &str = "files";

/// First byte of a binary `Output` frame. Every other frame is a JSON object, whose
/// first byte is `{`, or an `Input` frame ([`INPUT_TAG`]).
const OUTPUT_TAG: u8 = 0x01;
/// First byte of a binary `Input` frame.
const INPUT_TAG: u8 = 0x02;
/// Bytes of a binary `Input` frame before its data: the tag and the id.
const INPUT_HEADER: usize = 1 + 8;
/// Most bytes of input in one `Input` frame (one transport frame).
pub const INPUT_CHUNK: usize = crate::runtime::transport::MAX_PAYLOAD - INPUT_HEADER;
/// Most `Input` frames of one command or file a master sends before the slave says it
/// took them (`InputTaken`): what a slave holds for it is bounded by this many chunks
/// (512 KiB), and a master that sends more is cut off.
pub const INPUT_WINDOW: usize = 8;
/// Bytes of a binary `Output` frame before its data: the tag, the job id (u64, little
/// endian) and the stream (0 stdout, 1 stderr).
pub(crate) const OUTPUT_HEADER: usize = 1 + 8 + 1;

/// Encodes a frame: `Output` (the bulk of a session) as [`OUTPUT_TAG`], id, stream and
/// the bytes as they are, with no escaping; every other frame as JSON.
pub(crate) fn encode(frame: &Frame) -> Vec<u8> {
    match frame {
        Frame::Output { id, stream, data } => {
            let mut bytes = Vec::with_capacity(OUTPUT_HEADER + data.len());
            bytes.push(OUTPUT_TAG);
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.push(match stream {
                Stream::Stdout => 0,
                Stream::Stderr => 1,
            });
            bytes.extend_from_slice(data);
            bytes
        }
        Frame::Input { id, data } => {
            let mut bytes = Vec::with_capacity(INPUT_HEADER + data.len());
            bytes.push(INPUT_TAG);
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(data);
            bytes
        }
        _ => serde_json::to_vec(frame).unwrap_or_default(),
    }
}

/// Encodes a frame as one or more payloads of at most `max` bytes: output chunks and
/// log batches that would be too long once encoded are split, keeping their order.
pub(crate) fn encode_split(frame: Frame, max: usize) -> Vec<Vec<u8>> {
    match frame {
        Frame::Output { id, stream, data } if OUTPUT_HEADER + data.len() > max => {
            let per_frame = max.saturating_sub(OUTPUT_HEADER).max(1);
            data.chunks(per_frame)
                .map(|chunk| {
                    encode(&Frame::Output {
                        id,
                        stream,
                        data: chunk.to_vec(),
                    })
                })
                .collect()
        }
        frame => {
            let bytes = encode(&frame);
            if bytes.len() <= max {
                return vec![bytes];
            }
            match frame {
                Frame::Log { mut lines } if !lines.is_empty() => {
                    let rest = if lines.len() > 1 {
                        lines.split_off(lines.len() / 2)
                    } else {
                        let line = lines.pop().unwrap_or_default();
                        let mut cut = line.len() / 2;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        lines.push(line[..cut].to_string());
                        vec![line[cut..].to_string()]
                    };
                    let mut out = encode_split(Frame::Log { lines }, max);
                    out.extend(encode_split(Frame::Log { lines: rest }, max));
                    out
                }
                // Other frames are small, or (call results) refused by the transport as
                // too long.
                _ => vec![bytes],
            }
        }
    }
}

/// Standard base64 (RFC 4648, with padding) of `bytes`.
///
/// ```
/// assert_eq!(localnet::protocol::base64_encode(b"a\xffb"), "Yf9i");
/// assert_eq!(localnet::protocol::base64_decode("Yf9i").unwrap(), b"a\xffb");
/// ```
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes of standard base64 text (padding required); `None` if it is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Serde for a byte field as a base64 string.
mod base64_field {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::base64_encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::base64_decode(&text).ok_or_else(|| D::Error::custom("invalid base64"))
    }
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A JSON frame that does not parse: serde's message (what is missing, unknown or
    /// mistyped).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A binary output frame shorter than its header.
    #[error("an output frame of {0} bytes is shorter than its {OUTPUT_HEADER}-byte header")]
    ShortOutput(usize),
    /// A binary output frame naming a stream other than 0 (stdout) or 1 (stderr).
    #[error("an output frame names stream {0}, not 0 (stdout) or 1 (stderr)")]
    UnknownStream(u8),
    /// A binary input frame shorter than its header, or longer than a chunk.
    #[error("an input frame of {0} bytes is not {INPUT_HEADER} to {max} bytes long", max = INPUT_HEADER + INPUT_CHUNK)]
    BadInput(usize),
}

/// Decodes a frame.
pub(crate) fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    if bytes.first() == Some(&INPUT_TAG) {
        return match bytes.split_at_checked(INPUT_HEADER) {
            Some((header, data)) if data.len() <= INPUT_CHUNK => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&header[1..9]);
                Ok(Frame::Input {
                    id: u64::from_le_bytes(id),
                    data: data.to_vec(),
                })
            }
            _ => Err(DecodeError::BadInput(bytes.len())),
        };
    }
    if bytes.first() != Some(&OUTPUT_TAG) {
        return Ok(serde_json::from_slice(bytes)?);
    }
    let Some((header, data)) = bytes.split_at_checked(OUTPUT_HEADER) else {
        return Err(DecodeError::ShortOutput(bytes.len()));
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&header[1..9]);
    let stream = match header[9] {
        0 => Stream::Stdout,
        1 => Stream::Stderr,
        other => return Err(DecodeError::UnknownStream(other)),
    };
    Ok(Frame::Output {
        id: u64::from_le_bytes(id),
        stream,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_ids_parse_and_print() {
        let n: NodeId = "nid://10.0.0.1:80".parse().unwrap();
        assert_eq!(n.addr(), "10.0.0.1:80".parse().unwrap());
        assert_eq!("10.0.0.1:80".parse::<NodeId>().unwrap(), n);
        assert!("nid://nonsense".parse::<NodeId>().is_err());
        assert_eq!(serde_json::to_value(n).unwrap(), json!("nid://10.0.0.1:80"));
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Call {
                id: 1,
                name: "f".into(),
                arg: json!([1, 2]),
            },
            Frame::Output {
                id: 2,
                stream: Stream::Stderr,
                data: b"a\n\xffb\0 no newline".to_vec(),
            },
            Frame::Exit {
                id: 3,
                exit: JobExit {
                    code: Some(1),
                    signal: None,
                    timed_out: false,
                    error: None,
                    refused: false,
                    lost: false,
                },
            },
            Frame::Terminate,
            Frame::Input {
                id: 4,
                data: b"\x01{not json\n".to_vec(),
            },
            Frame::Input {
                id: 5,
                data: Vec::new(),
            },
            Frame::InputEnd {
                id: 4,
                sha256: Some("ab".into()),
            },
            Frame::PutFile {
                id: 6,
                path: "/tmp/x".into(),
                name: "x".into(),
                mode: 0o755,
                size: 3,
                into_dir: true,
            },
        ];
        for f in frames {
            assert_eq!(decode(&encode(&f)).unwrap(), f);
        }
        let err = decode(b"{\"t\":\"nope\"}").unwrap_err();
        assert!(err.to_string().contains("unknown variant `nope`"), "{err}");
        let err = decode(&[OUTPUT_TAG, 1, 2]).unwrap_err();
        assert!(
            err.to_string().contains("shorter than its 10-byte header"),
            "{err}"
        );
        let err = decode(&[OUTPUT_TAG, 0, 0, 0, 0, 0, 0, 0, 0, 7, b'x']).unwrap_err();
        assert!(err.to_string().contains("names stream 7"), "{err}");
        let err = decode(&[INPUT_TAG, 1, 2]).unwrap_err();
        assert!(err.to_string().contains("input frame of 3 bytes"), "{err}");
        let mut long = vec![INPUT_TAG; INPUT_HEADER + INPUT_CHUNK + 1];
        long[0] = INPUT_TAG;
        assert!(matches!(decode(&long), Err(DecodeError::BadInput(_))));
        // An old master's Exec (no stdin field) still decodes, with no stdin.
        let old = decode(br#"{"t":"exec","id":1,"argv":["true"],"timeout_ms":null}"#).unwrap();
        assert!(matches!(old, Frame::Exec { stdin: false, .. }), "{old:?}");
        // Output travels as its bytes, with a 10-byte header and nothing escaped.
        let data = vec![b'"'; 1000];
        let wire = encode(&Frame::Output {
            id: 9,
            stream: Stream::Stdout,
            data,
        });
        assert_eq!(wire.len(), OUTPUT_HEADER + 1000);
    }

    #[test]
    fn long_output_is_split_in_order() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let frame = Frame::Output {
            id: 1,
            stream: Stream::Stdout,
            data: data.clone(),
        };
        let parts = encode_split(frame, 65_000);
        assert!(parts.len() > 1);
        let mut back = Vec::new();
        for p in &parts {
            assert!(p.len() <= 65_000);
            match decode(p).unwrap() {
                Frame::Output { data, .. } => back.extend(data),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, data);
        let huge = Frame::Log {
            lines: vec!["é".repeat(40_000)],
        };
        let parts = encode_split(huge, 65_000);
        let joined: String = parts
            .iter()
            .map(|p| match decode(p).unwrap() {
                Frame::Log { lines } => lines.concat(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(joined, "é".repeat(40_000));
    }

    #[test]
    fn base64_round_trips_every_length_and_refuses_nonsense() {
        let bytes: Vec<u8> = (0..=255u8).rev().collect();
        for len in 0..bytes.len() {
            let text = base64_encode(&bytes[..len]);
            assert_eq!(text.len(), len.div_ceil(3) * 4);
            assert_eq!(base64_decode(&text).unwrap(), &bytes[..len]);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        for bad in ["Zm8", "Zm=8", "Z===", "Zm8=Zm8=", "Zm9v!mFy"] {
            assert!(base64_decode(bad).is_none(), "{bad}");
        }
    }
}
