//! The PROXY protocol (v1 text and v2 binary, HAProxy's spec): a load balancer that forwards
//! TCP says, in a header before the first byte of the client's, who the client is.
//!
//! Parsing is the `ppp` crate's (widely used, no unsafe, both versions, partial-input aware);
//! framing is ours: we read in chunks until `ppp` has a complete header, and the bytes read past
//! it (the client's TLS ClientHello or HTTP preface) are handed back in front of the stream by
//! [`Prefixed`]. A header is believed only from `server.trusted_proxies`; from anyone else its
//! mere presence refuses the connection, since a client that sends one is trying to choose the
//! address we would account it under.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// v1 lines are at most 107 bytes; v2 headers carry TLVs, which load balancers keep small
/// (AWS: a few dozen bytes). Anything longer is not a header we will wait for.
const MAX_HEADER: usize = 1024;
/// The longest v1 header, `\r\n` included (the spec's 107 bytes).
const V1_MAX: usize = 107;

/// Why a connection's PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// A trusted proxy's connection did not start with a valid header.
    Invalid,
    /// A peer outside `server.trusted_proxies` sent one.
    Untrusted,
    /// The connection closed before the header was complete.
    Closed,
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the start of a connection turned out to be.
enum Start {
    /// A PROXY header (complete or not yet).
    Header,
    /// Anything else: TLS, HTTP/1, the h2 preface.
    Other,
    /// Too few bytes to tell.
    Undecided,
}

fn classify(buf: &[u8]) -> Start {
    for signature in [&V1_PREFIX[..], &V2_SIGNATURE[..]] {
        let n = buf.len().min(signature.len());
        if buf[..n] == signature[..n] {
            return if n == signature.len() { Start::Header } else { Start::Undecided };
        }
    }
    Start::Other
}

/// Reads a trusted proxy's header: the client's address (`None` for `LOCAL` / `UNKNOWN`
/// headers, the proxy's own health checks: the connection's address stands) and the stream
/// with whatever followed the header.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Option<SocketAddr>, Prefixed<S>), HeaderError> {
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).await.map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        // `ppp` reads a v1 line cut inside an address or port (`PROXY TCP4 192.`) as invalid,
        // not as partial, so a header split across two reads would refuse a good connection:
        // a v1 line that does not parse yet is waited for until its CRLF has arrived (or more
        // than a v1 line can hold). What `ppp` accepts is taken as soon as it parses: it ends
        // some lines at a bare LF, others only at CRLF (the fuzzer found both).
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() > MAX_HEADER {
                return Err(HeaderError::Invalid);
            }
            continue;
        }
        let (len, source) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
                let v1_unfinished = V1_PREFIX.starts_with(&buf[..buf.len().min(V1_PREFIX.len())])
                    && !buf.windows(2).any(|w| w == b"\r\n")
                    && buf.len() <= V1_MAX;
                if v1_unfinished {
                    continue;
                }
                return Err(HeaderError::Invalid);
            }
        };
        let rest = buf.split_off(len);
        return Ok((source, Prefixed::new(rest, stream)));
    }
}

/// For a peer that may not send a header: reads just enough to be sure it did not, and gives
/// the stream back with those bytes in front.
pub async fn refuse_header<S: AsyncRead + Unpin>(mut stream: S) -> Result<Prefixed<S>, HeaderError> {
    let mut buf = Vec::with_capacity(64);
    loop {
        let mut chunk = [0u8; 64];
        let n = stream.read(&mut chunk).await.map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify(&buf) {
            Start::Header => return Err(HeaderError::Untrusted),
            Start::Other => return Ok(Prefixed::new(buf, stream)),
            Start::Undecided => {}
        }
    }
}

fn v1_source(a: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == ppp::v2::Command::Local {
        return None;
    }
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn through(input: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(input).await.unwrap();
        drop(client);
        match read_header(server).await {
            Ok((source, mut rest)) => {
                let mut after = Vec::new();
                rest.read_to_end(&mut after).await.unwrap();
                (Ok(source), after)
            }
            Err(e) => (Err(e), Vec::new()),
        }
    }

    #[tokio::test]
    async fn v1_and_v2_headers_give_the_source_and_keep_what_follows() {
        let (src, rest) = through(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(src, Ok(Some("192.0.2.7:51000".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            ("[2001:db8::5]:4000".parse::<SocketAddr>().unwrap(), "[2001:db8::1]:443".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        let mut input = v2.clone();
        input.extend_from_slice(b"\x16\x03\x01");
        let (src, rest) = through(&input).await;
        assert_eq!(src, Ok(Some("[2001:db8::5]:4000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01");

        let (src, _) = through(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(src, Ok(None), "a health check keeps the connection's address");
        let (src, _) = through(b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(src, Err(HeaderError::Invalid));
        let (src, _) = through(b"PROXY TCP4 192.0.2.7").await;
        assert_eq!(src, Err(HeaderError::Closed));
    }

    #[tokio::test]
    async fn a_v1_header_split_across_reads_is_read_whole() {
        // Found by the property tests: a read that ended inside an address refused the header.
        let input = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET /";
        for cut in 1..input.len() {
            let (mut client, server) = tokio::io::duplex(4096);
            let reader = tokio::spawn(async move {
                let (src, mut rest) = read_header(server).await.expect("a valid header");
                let mut after = Vec::new();
                rest.read_to_end(&mut after).await.unwrap();
                (src, after)
            });
            client.write_all(&input[..cut]).await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(&input[cut..]).await.unwrap();
            drop(client);
            let (src, after) = reader.await.unwrap();
            assert_eq!(src, Some("192.0.2.7:51000".parse().unwrap()), "cut at {cut}");
            assert_eq!(after, b"GET /", "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn a_header_from_an_untrusted_peer_is_refused_and_anything_else_kept() {
        for refused in [&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..], &V2_SIGNATURE[..]] {
            let (mut client, server) = tokio::io::duplex(4096);
            client.write_all(refused).await.unwrap();
            assert!(matches!(refuse_header(server).await, Err(HeaderError::Untrusted)));
        }
        for kept in [&b"PRI * HTTP/2.0\r\n"[..], b"POST /v1 HTTP/1.1\r\n", b"\x16\x03\x01\x00"] {
            let (mut client, server) = tokio::io::duplex(4096);
            client.write_all(kept).await.unwrap();
            drop(client);
            let mut rest = Vec::new();
            refuse_header(server).await.map_err(|_| ()).unwrap().read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, kept);
        }
    }
}

/// Framing as properties: whatever the bytes and however the socket splits them into reads, a
/// header is read whole or refused, and not one byte after it is lost or reordered.
#[cfg(test)]
mod property {
    use std::future::Future;
    use std::net::{IpAddr, SocketAddr};
    use std::pin::pin;

    use proptest::prelude::*;

    use super::*;

    /// A socket that delivers `data` in reads of the given sizes (then the rest), never waiting.
    struct Reads {
        data: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
    }

    impl AsyncRead for Reads {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let size = if self.sizes.is_empty() { usize::MAX } else { self.sizes.remove(0) };
            let n = (self.data.len() - self.at).min(size).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn ready<F: Future>(fut: F) -> F::Output {
        match pin!(fut).poll(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => unreachable!("in-memory reads never wait"),
        }
    }

    fn rest_of<S: AsyncRead + Unpin>(mut s: Prefixed<S>) -> Vec<u8> {
        let mut out = Vec::new();
        ready(s.read_to_end(&mut out)).unwrap();
        out
    }

    fn sizes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..300, 0..8)
    }

    /// A header for `src` in either version (v2 with a TLV or not), as a load balancer sends it.
    fn header(src: SocketAddr, v2: bool, tlv: Option<Vec<u8>>) -> Vec<u8> {
        let dst: SocketAddr = match src.ip() {
            IpAddr::V4(_) => "10.0.0.1:443".parse().unwrap(),
            IpAddr::V6(_) => "[2001:db8::1]:443".parse().unwrap(),
        };
        if !v2 {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            return format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes();
        }
        let mut b = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        );
        if let Some(value) = tlv {
            b = b.write_tlv(ppp::v2::Type::NoOp, &value).unwrap();
        }
        b.build().unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn a_trusted_header_is_read_whole_and_what_follows_kept(
            src in any::<SocketAddr>(),
            v2 in any::<bool>(),
            tlv in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            tail in prop::collection::vec(any::<u8>(), 0..600),
            sizes in sizes(),
        ) {
            // v1 carries no flow info or scope id; v2 neither.
            let src = SocketAddr::new(src.ip(), src.port());
            let mut data = header(src, v2, tlv);
            data.extend_from_slice(&tail);
            let (source, rest) = ready(read_header(Reads { data, at: 0, sizes })).expect("a valid header");
            prop_assert_eq!(source, Some(src));
            prop_assert_eq!(rest_of(rest), tail);
        }

        #[test]
        fn any_bytes_are_a_header_or_refused_never_a_panic_or_a_lost_byte(
            prefix in prop::sample::select(vec![&b""[..], b"PROXY ", b"PROXY TCP4 ", V2_SIGNATURE, b"\r\n\r\n"]),
            body in prop::collection::vec(any::<u8>(), 0..1400),
            sizes in sizes(),
        ) {
            let mut data = prefix.to_vec();
            data.extend_from_slice(&body);
            match ready(read_header(Reads { data: data.clone(), at: 0, sizes: sizes.clone() })) {
                Ok((_, rest)) => {
                    let after = rest_of(rest);
                    prop_assert!(data.ends_with(&after));
                    let consumed = &data[..data.len() - after.len()];
                    let len = match HeaderResult::parse(consumed) {
                        HeaderResult::V1(Ok(h)) => h.header.len(),
                        HeaderResult::V2(Ok(h)) => h.len(),
                        other => panic!("consumed {consumed:?}, not a header: {other:?}"),
                    };
                    prop_assert_eq!(len, consumed.len(), "exactly one header consumed");
                }
                Err(e) => prop_assert!(matches!(e, HeaderError::Invalid | HeaderError::Closed)),
            }
            match ready(refuse_header(Reads { data: data.clone(), at: 0, sizes })) {
                Ok(rest) => prop_assert_eq!(rest_of(rest), data),
                Err(HeaderError::Untrusted) => prop_assert!(data.starts_with(V1_PREFIX) || data.starts_with(V2_SIGNATURE)),
                Err(e) => prop_assert_eq!(e, HeaderError::Closed),
            }
        }
    }
}
