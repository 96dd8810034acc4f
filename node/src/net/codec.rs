//! Byte framing of imiswarm's protocols over libp2p streams.
//!
//! Control messages ride libp2p request-response: one message per stream direction, closed by
//! the writer, so the message is everything up to end of stream (bounded by the type's limit).
//! Piece streams carry small headers, each prefixed by its length (u16, big endian), and raw
//! piece bytes after each frame header.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::limits::CONTROL_PROTOCOL;
use imiswarm_protocol::wire::{ControlRequest, ControlResponse};
use libp2p::StreamProtocol;

pub const CONTROL: StreamProtocol = StreamProtocol::new(CONTROL_PROTOCOL);

/// Reads one whole message of at most `T::MAX_SIZE` bytes and decodes it.
async fn read_message<T: WireFormat, R: AsyncRead + Unpin + Send>(io: &mut R) -> io::Result<T> {
    let mut bytes = Vec::new();
    // One byte past the limit tells "too large" apart from "exactly at the limit".
    io.take(T::MAX_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .await?;
    T::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_message<T: WireFormat, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    message: &T,
) -> io::Result<()> {
    let bytes = message
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&bytes).await?;
    io.close().await
}

/// The request-response codec of [`CONTROL`].
#[derive(Debug, Clone, Default)]
pub struct ControlCodec;

impl libp2p::request_response::Codec for ControlCodec {
    type Protocol = StreamProtocol;
    type Request = ControlRequest;
    type Response = ControlResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ControlRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ControlResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ControlRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: ControlResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &res).await
    }
}

/// Appends one length-prefixed header of a piece stream to `out`.
pub fn encode_header<T: WireFormat>(header: &T, out: &mut Vec<u8>) -> io::Result<()> {
    let bytes = header
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len =
        u16::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Writes one length-prefixed header of a piece stream, in one write: every write on a
/// stream becomes a multiplexer frame, an encrypted transport frame and a TCP segment.
pub async fn write_header<T: WireFormat, W: AsyncWrite + Unpin>(
    io: &mut W,
    header: &T,
) -> io::Result<()> {
    let mut bytes = Vec::new();
    encode_header(header, &mut bytes)?;
    io.write_all(&bytes).await
}

/// Reads one length-prefixed header of a piece stream, refusing lengths over `T::MAX_SIZE`.
pub async fn read_header<T: WireFormat, R: AsyncRead + Unpin>(io: &mut R) -> io::Result<T> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > T::MAX_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} header of {len} bytes exceeds {}", T::KIND, T::MAX_SIZE),
        ));
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    T::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imiswarm_protocol::hash::Hash;
    use imiswarm_protocol::wire::PieceRequest;

    #[tokio::test]
    async fn headers_round_trip_and_oversize_is_refused() {
        let req = PieceRequest {
            manifest_id: Hash::of(b"m"),
            first: 3,
            count: 2,
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &req).await.unwrap();
        let back: PieceRequest = read_header(&mut &buf[..]).await.unwrap();
        assert_eq!(back, req);

        let mut huge = vec![0xff, 0xff];
        huge.extend(vec![0u8; 100]);
        let err = read_header::<PieceRequest, _>(&mut &huge[..])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Truncated input is an error, not a hang or a panic.
        assert!(
            read_header::<PieceRequest, _>(&mut &buf[..buf.len() - 1])
                .await
                .is_err()
        );
    }
}
