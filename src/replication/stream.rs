//! The streaming half of a replication connection: after `CopyBothResponse`
//! the socket is split between a reader task and a writer task.
//!
//! - The reader parses every complete frame it has buffered before reading
//!   again, and sends each message into a bounded channel. When the consumer
//!   stops receiving, the channel fills, the reader stops reading, the
//!   socket's buffers fill and the server stops sending: backpressure.
//! - The writer owns the write half and sends standby status updates when
//!   a [`FeedbackHandle`] asks. It never waits for the reader, so feedback
//!   (and the server's `wal_sender_timeout`) is unaffected by a full channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::connection::{describe, log_notice};
use super::error::ReplicationError;
use super::message::{
    encode_copy_done, encode_status, parse_copy_data, pg_timestamp, ReplicationMessage,
    StandbyStatus,
};
use super::wire::{self, BackendMessage};

/// Space reserved for each socket read: large reads mean few syscalls and
/// many frames parsed per wake-up.
const READ_CHUNK: usize = 128 * 1024;
/// Below this much free space the read buffer is grown by [`READ_CHUNK`].
const MIN_READ_SPACE: usize = 16 * 1024;
/// Status updates waiting for the writer; callers wait when it is full.
const FEEDBACK_QUEUE: usize = 16;
/// How long one write of feedback may take before the writer gives up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`ReplicationStream::finish`] waits for the server to end COPY.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

type Item = Result<ReplicationMessage, ReplicationError>;

/// A running logical replication stream.
///
/// Receive messages with [`recv`](Self::recv); send progress with
/// [`send_status`](Self::send_status) or a [`FeedbackHandle`] from
/// [`feedback`](Self::feedback), typically on a timer in another task; end
/// with [`finish`](Self::finish). Dropping the stream closes the connection
/// abruptly (the server keeps the slot's last confirmed position).
#[derive(Debug)]
pub struct ReplicationStream {
    rx: mpsc::Receiver<Item>,
    feedback: FeedbackHandle,
    finishing: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl ReplicationStream {
    /// Splits `socket` and starts the reader and writer tasks. `already_read`
    /// holds bytes read past the `CopyBothResponse`, which belong to the
    /// stream.
    pub(crate) fn spawn<S>(socket: S, already_read: BytesMut, buffer: usize) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(socket);
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let (commands, command_rx) = mpsc::channel(FEEDBACK_QUEUE);
        let finishing = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(run_reader(
            read_half,
            already_read,
            tx,
            Arc::clone(&finishing),
        ));
        let writer = tokio::spawn(run_writer(write_half, command_rx));
        ReplicationStream {
            rx,
            feedback: FeedbackHandle { commands },
            finishing,
            reader: Some(reader),
            writer: Some(writer),
        }
    }

    /// The next message. An `Err` item (I/O failure, server error, protocol
    /// violation, or the server ending the stream) is the last one: `None`
    /// follows.
    pub async fn recv(&mut self) -> Option<Result<ReplicationMessage, ReplicationError>> {
        self.rx.recv().await
    }

    /// Waits for at least one message, then moves up to `limit` (at least 1)
    /// messages that are already buffered into `out`. Returns how many were
    /// added; 0 means the stream has ended.
    pub async fn recv_many(
        &mut self,
        out: &mut Vec<Result<ReplicationMessage, ReplicationError>>,
        limit: usize,
    ) -> usize {
        self.rx.recv_many(out, limit.max(1)).await
    }

    /// A cloneable handle for sending status updates from another task.
    pub fn feedback(&self) -> FeedbackHandle {
        self.feedback.clone()
    }

    /// Sends a standby status update now (see [`FeedbackHandle::send_status`]).
    pub async fn send_status(&self, status: StandbyStatus) -> Result<(), ReplicationError> {
        self.feedback.send_status(status).await
    }

    /// Ends streaming politely: sends `final_status` (if any) and CopyDone,
    /// discards what the server still sends until it ends COPY (at most 10
    /// seconds), then sends Terminate and closes the socket.
    ///
    /// Messages not yet received are dropped: the server streams them again
    /// from the slot's confirmed position on the next start.
    pub async fn finish(
        mut self,
        final_status: Option<StandbyStatus>,
    ) -> Result<(), ReplicationError> {
        self.finishing.store(true, Ordering::Release);
        let ended = self
            .feedback
            .call(|done| WriterCommand::EndCopy {
                status: final_status,
                done,
            })
            .await;
        let drained = match &ended {
            Ok(()) => {
                let rx = &mut self.rx;
                let drain = async move {
                    let mut last_err = None;
                    while let Some(item) = rx.recv().await {
                        if let Err(e) = item {
                            last_err = Some(e);
                        }
                    }
                    last_err
                };
                match tokio::time::timeout(FINISH_TIMEOUT, drain).await {
                    Ok(None) => Ok(()),
                    Ok(Some(e)) => Err(e),
                    Err(_) => Err(ReplicationError::Timeout {
                        what: "waiting for the server to end the replication stream",
                        after: FINISH_TIMEOUT,
                    }),
                }
            }
            Err(_) => Ok(()),
        };
        let terminated = match &ended {
            Ok(()) => {
                self.feedback
                    .call(|done| WriterCommand::Terminate { done })
                    .await
            }
            Err(_) => Ok(()),
        };
        if let Some(writer) = self.writer.take() {
            // The writer has returned after Terminate or its failure.
            let _ = writer.await;
        }
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        tracing::info!("logical replication finished");
        ended.and(drained).and(terminated)
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        for task in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// Sends standby status updates for a [`ReplicationStream`], from any task.
///
/// Cheap to clone. Every method fails with [`ReplicationError::Closed`] once
/// the writer has stopped (after a failed write, after
/// [`ReplicationStream::finish`], or when the stream was dropped).
#[derive(Clone, Debug)]
pub struct FeedbackHandle {
    commands: mpsc::Sender<WriterCommand>,
}

impl FeedbackHandle {
    /// Sends a standby status update and returns once it has been written to
    /// the socket. The client clock is filled in here. A write error or a
    /// write that takes more than 30 seconds fails this call and stops the
    /// writer: the stream is then unusable, reconnect.
    pub async fn send_status(&self, status: StandbyStatus) -> Result<(), ReplicationError> {
        self.call(|done| WriterCommand::Status { status, done })
            .await
    }

    /// True once the writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// Resolves when the writer stops, for use in `tokio::select!`.
    pub async fn closed(&self) {
        self.commands.closed().await;
    }

    async fn call(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), ReplicationError>>) -> WriterCommand,
    ) -> Result<(), ReplicationError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(command(done))
            .await
            .map_err(|_| writer_stopped())?;
        result.await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> ReplicationError {
    ReplicationError::Closed(
        "the feedback writer has stopped (an earlier write failed, or the stream was finished \
         or dropped)"
            .into(),
    )
}

#[derive(Debug)]
enum WriterCommand {
    Status {
        status: StandbyStatus,
        done: oneshot::Sender<Result<(), ReplicationError>>,
    },
    EndCopy {
        status: Option<StandbyStatus>,
        done: oneshot::Sender<Result<(), ReplicationError>>,
    },
    Terminate {
        done: oneshot::Sender<Result<(), ReplicationError>>,
    },
}

async fn run_writer<W: AsyncWrite + Unpin>(mut w: W, mut commands: mpsc::Receiver<WriterCommand>) {
    let mut buf = BytesMut::with_capacity(128);
    let mut copy_open = true;
    while let Some(command) = commands.recv().await {
        buf.clear();
        let (done, last) = match command {
            WriterCommand::Status { status, done } => {
                if !copy_open {
                    let _ = done.send(Err(ReplicationError::Closed(
                        "the replication stream is finishing; no more status updates".into(),
                    )));
                    continue;
                }
                encode_status(&status, pg_timestamp(SystemTime::now()), &mut buf);
                (done, false)
            }
            WriterCommand::EndCopy { status, done } => {
                if copy_open {
                    if let Some(status) = status {
                        encode_status(&status, pg_timestamp(SystemTime::now()), &mut buf);
                    }
                    encode_copy_done(&mut buf);
                    copy_open = false;
                }
                (done, false)
            }
            WriterCommand::Terminate { done } => {
                frontend::terminate(&mut buf);
                (done, true)
            }
        };
        let result = write_all(&mut w, &buf, last).await;
        let failed = result.is_err();
        if let Err(e) = &result {
            tracing::warn!(error = %e, "replication feedback writer stopped");
        }
        let _ = done.send(result);
        if failed || last {
            return;
        }
    }
}

async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    shutdown: bool,
) -> Result<(), ReplicationError> {
    let io = async {
        w.write_all(buf).await?;
        w.flush().await?;
        if shutdown {
            w.shutdown().await?;
        }
        Ok(())
    };
    match tokio::time::timeout(WRITE_TIMEOUT, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ReplicationError::io("sending feedback to the server", e)),
        Err(_) => Err(ReplicationError::Timeout {
            what: "sending feedback to the server",
            after: WRITE_TIMEOUT,
        }),
    }
}

async fn run_reader<R: AsyncRead + Unpin>(
    mut r: R,
    mut buf: BytesMut,
    tx: mpsc::Sender<Item>,
    finishing: Arc<AtomicBool>,
) {
    if let Err(e) = read_stream(&mut r, &mut buf, &tx, &finishing).await {
        tracing::debug!(error = %e, "replication stream reader stopped");
        let _ = tx.send(Err(e)).await;
    }
}

/// Reads and forwards messages until the stream ends. `Ok` means a clean end
/// (asked for by `finish`, or nobody is listening any more).
async fn read_stream<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<Item>,
    finishing: &AtomicBool,
) -> Result<(), ReplicationError> {
    let unasked = |what: &str| {
        ReplicationError::Closed(format!(
            "the server ended the replication stream ({what}); it may be shutting down"
        ))
    };
    loop {
        while let Some(frame) = wire::decode_frame(buf)? {
            match frame.tag {
                wire::COPY_DATA => {
                    let msg = parse_copy_data(frame.body)?;
                    if tx.send(Ok(msg)).await.is_err() {
                        return Ok(());
                    }
                }
                wire::COPY_DONE if !finishing.load(Ordering::Acquire) => {
                    return Err(unasked("CopyDone"));
                }
                wire::COMMAND_COMPLETE if !finishing.load(Ordering::Acquire) => {
                    return Err(unasked("CommandComplete"));
                }
                wire::READY_FOR_QUERY => {
                    return if finishing.load(Ordering::Acquire) {
                        Ok(())
                    } else {
                        Err(unasked("ReadyForQuery"))
                    };
                }
                _ => match wire::parse_message(frame)? {
                    BackendMessage::Error(e) => return Err(ReplicationError::Server(Box::new(e))),
                    BackendMessage::Notice(n) => log_notice(&n),
                    BackendMessage::CopyDone
                    | BackendMessage::CommandComplete(_)
                    | BackendMessage::ParameterStatus { .. }
                    | BackendMessage::NotificationResponse => {}
                    other => {
                        return Err(ReplicationError::protocol(format!(
                            "unexpected {} while streaming",
                            describe(&other)
                        )))
                    }
                },
            }
        }
        wire::reserve_for_frame(buf)?;
        if buf.capacity() - buf.len() < MIN_READ_SPACE {
            buf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            read = r.read_buf(buf) => {
                read.map_err(|e| ReplicationError::io("reading the replication stream", e))?
            }
            () = tx.closed() => return Ok(()),
        };
        if n == 0 {
            if finishing.load(Ordering::Acquire) {
                return Ok(());
            }
            return Err(ReplicationError::Closed(if buf.is_empty() {
                "the server closed the connection".into()
            } else {
                "the server closed the connection in the middle of a message".into()
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use bytes::BufMut;
    use tokio::io::{duplex, DuplexStream};

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn xlog(start: u64, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(start);
        b.put_u64(start + 100);
        b.put_i64(42);
        b.put_slice(data);
        frame(b'd', &b)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(end);
        b.put_i64(7);
        b.put_u8(u8::from(reply));
        frame(b'd', &b)
    }

    /// Reads one frontend message as the server would.
    async fn read_frontend(s: &mut DuplexStream) -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut body = vec![0; usize::try_from(len - 4).unwrap()];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    #[tokio::test]
    async fn bytes_read_before_the_split_and_after_are_both_delivered() {
        let (client, mut server) = duplex(1 << 16);
        let early = BytesMut::from(&xlog(1, b"B")[..]);
        let mut stream = ReplicationStream::spawn(client, early, 8);
        let mut later = xlog(2, b"I");
        later.extend(keepalive(500, true));
        // Split the second write inside a frame header.
        server.write_all(&later[..3]).await.unwrap();
        server.flush().await.unwrap();
        tokio::task::yield_now().await;
        server.write_all(&later[3..]).await.unwrap();

        let first = stream.recv().await.unwrap().unwrap();
        assert!(
            matches!(first, ReplicationMessage::XLogData { wal_start: Lsn(1), ref data, .. } if &data[..] == b"B")
        );
        let second = stream.recv().await.unwrap().unwrap();
        assert!(matches!(
            second,
            ReplicationMessage::XLogData {
                wal_start: Lsn(2),
                wal_end: Lsn(102),
                server_time: 42,
                ..
            }
        ));
        assert_eq!(
            stream.recv().await.unwrap().unwrap(),
            ReplicationMessage::PrimaryKeepAlive {
                wal_end: Lsn(500),
                server_time: 7,
                reply_requested: true
            }
        );
    }

    #[tokio::test]
    async fn server_error_arrives_as_the_last_item() {
        let (client, mut server) = duplex(1 << 16);
        let mut stream = ReplicationStream::spawn(client, BytesMut::new(), 8);
        let mut bytes = keepalive(1, false);
        bytes.extend(frame(b'N', b"SWARNING\0C01000\0Mjust a notice\0\0"));
        bytes.extend(frame(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
        ));
        server.write_all(&bytes).await.unwrap();
        assert!(stream.recv().await.unwrap().is_ok());
        let err = stream.recv().await.unwrap().unwrap_err();
        assert_eq!(err.sqlstate(), Some("57P01"));
        assert!(err.is_transient());
        assert!(stream.recv().await.is_none());
    }

    #[tokio::test]
    async fn malformed_frames_and_unknown_messages_end_the_stream() {
        for bad in [
            vec![b'd', 0, 0, 0, 2], // length below 4
            frame(b'd', b"x"),      // unknown CopyData type
            frame(b'd', b"k\0\0"),  // truncated keepalive
            frame(b'T', &[0, 0]),   // not expected while streaming
        ] {
            let (client, mut server) = duplex(1 << 16);
            let mut stream = ReplicationStream::spawn(client, BytesMut::new(), 8);
            server.write_all(&bad).await.unwrap();
            let err = stream.recv().await.unwrap().unwrap_err();
            assert!(
                matches!(err, ReplicationError::Protocol(_)),
                "{bad:?}: {err:?}"
            );
            assert!(stream.recv().await.is_none());
        }
    }

    #[tokio::test]
    async fn eof_and_unrequested_end_of_copy_are_transient_closed_errors() {
        let (client, server) = duplex(1 << 16);
        let mut stream = ReplicationStream::spawn(client, BytesMut::new(), 8);
        drop(server);
        let err = stream.recv().await.unwrap().unwrap_err();
        assert!(
            matches!(err, ReplicationError::Closed(_)) && err.is_transient(),
            "{err:?}"
        );

        // What a walsender sends when the server shuts down.
        let (client, mut server) = duplex(1 << 16);
        let mut stream = ReplicationStream::spawn(client, BytesMut::new(), 8);
        server.write_all(&frame(b'C', b"COPY 0\0")).await.unwrap();
        let err = stream.recv().await.unwrap().unwrap_err();
        assert!(matches!(err, ReplicationError::Closed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn status_updates_go_out_while_the_receive_channel_is_full() {
        let (client, mut server) = duplex(64 * 1024);
        let stream = ReplicationStream::spawn(client, BytesMut::new(), 1);
        // Far more data than the channel and the duplex pipe can hold.
        let writer = tokio::spawn(async move {
            let one = xlog(1, &[0; 200]);
            let mut out = Vec::new();
            for _ in 0..2000 {
                out.extend_from_slice(&one);
            }
            let _ = server.write_all(&out).await;
            server
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !writer.is_finished(),
            "the reader should have stopped reading"
        );
        let feedback = stream.feedback();
        tokio::time::timeout(
            Duration::from_secs(5),
            feedback.send_status(StandbyStatus::confirmed(Lsn(0x10))),
        )
        .await
        .expect("feedback must not wait for the reader")
        .unwrap();
        drop(stream);
        let mut server = writer.await.unwrap();
        let (tag, body) = read_frontend(&mut server).await;
        assert_eq!((tag, body[0]), (b'd', b'r'));
        assert_eq!(&body[9..17], &0x10u64.to_be_bytes(), "flush LSN");
    }

    #[tokio::test]
    async fn finish_sends_status_and_copy_done_then_terminate_after_the_server_ends_copy() {
        let (client, mut server) = duplex(1 << 16);
        let mut stream = ReplicationStream::spawn(client, BytesMut::new(), 4);
        server.write_all(&xlog(1, b"B")).await.unwrap();
        assert!(stream.recv().await.unwrap().is_ok());
        let srv = tokio::spawn(async move {
            // Messages still in flight when the client says CopyDone.
            server.write_all(&xlog(2, b"C")).await.unwrap();
            let (tag, body) = read_frontend(&mut server).await;
            assert_eq!((tag, body[0]), (b'd', b'r'));
            let (tag, _) = read_frontend(&mut server).await;
            assert_eq!(tag, b'c');
            let mut end = frame(b'c', b"");
            end.extend(frame(b'C', b"COPY 0\0"));
            end.extend(frame(b'Z', b"I"));
            server.write_all(&end).await.unwrap();
            let (tag, _) = read_frontend(&mut server).await;
            assert_eq!(tag, b'X');
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "nothing after Terminate");
        });
        let feedback = stream.feedback();
        stream
            .finish(Some(StandbyStatus::confirmed(Lsn(9))))
            .await
            .unwrap();
        srv.await.unwrap();
        assert!(feedback.is_closed());
        assert!(matches!(
            feedback.send_status(StandbyStatus::default()).await,
            Err(ReplicationError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_write_stops_the_writer_and_later_sends_fail() {
        let (client, server) = duplex(1 << 16);
        let stream = ReplicationStream::spawn(client, BytesMut::new(), 4);
        drop(server);
        let feedback = stream.feedback();
        let first = feedback.send_status(StandbyStatus::default()).await;
        assert!(
            matches!(first, Err(ReplicationError::Io { .. })),
            "{first:?}"
        );
        tokio::time::timeout(Duration::from_secs(1), feedback.closed())
            .await
            .unwrap();
        assert!(matches!(
            stream.send_status(StandbyStatus::default()).await,
            Err(ReplicationError::Closed(_))
        ));
    }
}
