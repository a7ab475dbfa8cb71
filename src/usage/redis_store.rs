//! `usage_store = "redis://HOST:PORT/DB"`: budget counters several keyrelay
//! replicas share, in Redis.
//!
//! Each account's window is one key, `keyrelay:budget:SCOPE:NAME:WINDOW:START`,
//! holding the tokens spent (and reserved) in it; the key expires a window
//! after its own ends, so Redis never holds more than the current and the
//! previous window. A request costs one round trip before it is sent (an
//! `EVAL` that checks and reserves in all its budgets' keys atomically); the
//! settlement at the end of a stream (`INCRBY` of the difference) is sent
//! from a task of its own, off the streaming path.
//!
//! The client speaks just enough of RESP2 for `SELECT`, `EVAL`, `MGET`,
//! `INCRBY` and `EXPIRE`, pipelined, over plain TCP with a short timeout: three commands
//! do not justify a Redis client library and its dependencies. It keeps a
//! few idle connections and opens another when all are busy.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long connecting, or one pipelined exchange, may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Idle connections kept for the next request.
const MAX_IDLE: usize = 8;

/// Longest reply line (or bulk string) accepted from the server.
const MAX_REPLY: usize = 64 * 1024;

/// Where the shared counters are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddress {
    /// `host:port`.
    pub authority: String,
    /// The database number (`SELECT`).
    pub db: u32,
}

impl RedisAddress {
    /// Parses `redis://HOST[:PORT][/DB]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .trim()
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{url:?} is not local or redis://HOST:PORT/DB"))?;
        if rest.contains('@') {
            return Err(
                "Redis AUTH is not supported yet; run the Redis keyrelay shares without a password, \
                 reachable only from keyrelay's pods (a NetworkPolicy)"
                    .to_owned(),
            );
        }
        let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
        let db = match db {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| format!("{db:?} is not a Redis database number"))?,
        };
        if authority.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else if authority.contains(':') && !authority.ends_with(']') {
            return Err(format!("{url:?} has an invalid port"));
        } else {
            format!("{authority}:6379")
        };
        Ok(Self { authority, db })
    }
}

/// A reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nabc` or `$-1` (nil).
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`.
    Array(Vec<Reply>),
}

impl Reply {
    /// The number a `GET`/`MGET` value or an `INCRBY` reply holds; 0 for nil.
    pub fn as_count(&self) -> Option<u64> {
        match self {
            Self::Integer(value) => u64::try_from(*value).ok(),
            Self::Bulk(None) => Some(0),
            Self::Bulk(Some(text)) => std::str::from_utf8(text).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// A few connections to one Redis server.
#[derive(Debug)]
pub struct RedisClient {
    address: RedisAddress,
    idle: Mutex<Vec<Connection>>,
}

#[derive(Debug)]
struct Connection {
    stream: BufReader<TcpStream>,
}

impl RedisClient {
    /// A client for `address`; it connects on first use.
    pub fn new(address: RedisAddress) -> Self {
        Self {
            address,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `commands` in one pipeline and returns their replies, in order.
    /// A server error reply is returned as [`Reply::Error`]; a lost or slow
    /// connection is an `Err` (and the connection is dropped).
    pub async fn pipeline(&self, commands: &[Vec<Vec<u8>>]) -> io::Result<Vec<Reply>> {
        let idle = self.lock().pop();
        if let Some(connection) = idle {
            match self.exchange_on(connection, commands).await {
                // An idle connection the server (its `timeout`, a restart)
                // or a NAT closed meanwhile: nothing was read from it, so
                // the commands were not run; once more on a new one.
                Err(err) if is_stale(&err) => {}
                answered => return answered,
            }
        }
        let connection = self.connect().await?;
        self.exchange_on(connection, commands).await
    }

    /// One pipelined exchange on `connection`, which goes back to the idle
    /// list only if it completed.
    async fn exchange_on(
        &self,
        mut connection: Connection,
        commands: &[Vec<Vec<u8>>],
    ) -> io::Result<Vec<Reply>> {
        let replies = tokio::time::timeout(TIMEOUT, connection.exchange(commands))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer in time")
            })??;
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(connection);
        }
        Ok(replies)
    }

    async fn connect(&self) -> io::Result<Connection> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&self.address.authority))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connecting to Redis timed out")
            })??;
        stream.set_nodelay(true)?;
        let mut connection = Connection {
            stream: BufReader::new(stream),
        };
        if self.address.db != 0 {
            let select = command(&["SELECT", &self.address.db.to_string()]);
            let reply = tokio::time::timeout(TIMEOUT, connection.exchange(&[select]))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer SELECT")
                })??;
            if let Some(Reply::Error(message)) = reply.first() {
                return Err(io::Error::other(format!("Redis refused SELECT: {message}")));
            }
        }
        Ok(connection)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An error meaning the connection was closed before it was used.
fn is_stale(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// A command as RESP's array of bulk strings.
pub fn command(parts: &[&str]) -> Vec<Vec<u8>> {
    parts.iter().map(|part| part.as_bytes().to_vec()).collect()
}

impl Connection {
    async fn exchange(&mut self, commands: &[Vec<Vec<u8>>]) -> io::Result<Vec<Reply>> {
        let mut out = Vec::new();
        for parts in commands {
            out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
            for part in parts {
                out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
                out.extend_from_slice(part);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.stream.get_mut().write_all(&out).await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            match read_reply(&mut self.stream, 0).await {
                Ok(reply) => replies.push(reply),
                // Some commands ran: the error must not read as a stale
                // connection, or they would be run twice.
                Err(err) if !replies.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("Redis connection lost mid-reply: {err}"),
                    ))
                }
                Err(err) => return Err(err),
            }
        }
        Ok(replies)
    }
}

/// Reads one reply; arrays nest at most a few levels.
fn read_reply<'a>(
    stream: &'a mut BufReader<TcpStream>,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let line = read_line(stream).await?;
        let (kind, rest) = line.split_at(1);
        let invalid = || io::Error::new(io::ErrorKind::InvalidData, "not a RESP reply");
        let number = |text: &str| text.parse::<i64>().map_err(|_| invalid());
        Ok(match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Integer(number(rest)?),
            "$" => match number(rest)? {
                -1 => Reply::Bulk(None),
                len if (0..=MAX_REPLY as i64).contains(&len) => {
                    let mut data = vec![0; len as usize + 2];
                    stream.read_exact(&mut data).await?;
                    data.truncate(len as usize);
                    Reply::Bulk(Some(data))
                }
                _ => return Err(invalid()),
            },
            "*" if depth < 4 => match number(rest)? {
                -1 => Reply::Array(Vec::new()),
                len if (0..=1024).contains(&len) => {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(read_reply(stream, depth + 1).await?);
                    }
                    Reply::Array(items)
                }
                _ => return Err(invalid()),
            },
            _ => return Err(invalid()),
        })
    })
}

async fn read_line(stream: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    let read = (&mut *stream)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "Redis closed the connection",
        ));
    }
    if !line.ends_with(b"\r\n") || line.len() < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a RESP reply line",
        ));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "reply is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_their_defaults() {
        let parse = |url| RedisAddress::parse(url);
        assert_eq!(
            parse("redis://redis.keyrelay.svc:6380/2"),
            Ok(RedisAddress {
                authority: "redis.keyrelay.svc:6380".to_owned(),
                db: 2
            })
        );
        assert_eq!(
            parse("redis://10.0.0.5"),
            Ok(RedisAddress {
                authority: "10.0.0.5:6379".to_owned(),
                db: 0
            })
        );
        for bad in [
            "local-ish",
            "http://redis",
            "redis://",
            "redis://h:p/1",
            "redis://h/x",
            "redis://:pw@h",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_read_from_values_and_integers() {
        assert_eq!(Reply::Bulk(None).as_count(), Some(0));
        assert_eq!(Reply::Bulk(Some(b"125".to_vec())).as_count(), Some(125));
        assert_eq!(Reply::Integer(7).as_count(), Some(7));
        assert_eq!(Reply::Error("WRONGTYPE".into()).as_count(), None);
    }

    /// A one-connection server that answers each command line it reads
    /// with the next canned reply, to check the encoding and the parser.
    #[tokio::test]
    async fn a_pipeline_is_written_as_resp_and_its_replies_read_back() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut seen = vec![0; 1024];
            let mut got = Vec::new();
            let expected = b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$2\r\n25\r\n*3\r\n$4\r\nMGET\r\n$1\r\nk\r\n$1\r\nj\r\n";
            while got.len() < expected.len() {
                let n = socket.read(&mut seen).await.expect("read");
                assert!(n > 0, "client closed early");
                got.extend_from_slice(&seen[..n]);
            }
            assert_eq!(got, expected);
            socket
                .write_all(b":25\r\n*2\r\n$2\r\n25\r\n$-1\r\n")
                .await
                .expect("write");
            // Keep the socket until the client has read the replies.
            let _ = socket.read(&mut seen).await;
        });
        let client = RedisClient::new(RedisAddress {
            authority: addr.to_string(),
            db: 0,
        });
        let replies = client
            .pipeline(&[
                command(&["INCRBY", "k", "25"]),
                command(&["MGET", "k", "j"]),
            ])
            .await
            .expect("replies");
        assert_eq!(replies[0], Reply::Integer(25));
        assert_eq!(
            replies[1],
            Reply::Array(vec![Reply::Bulk(Some(b"25".to_vec())), Reply::Bulk(None)])
        );
        drop(client);
        server.await.expect("server");
    }
}
