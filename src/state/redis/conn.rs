//! The connection to Redis: a single Redis (reconnecting by itself) or a Redis Cluster, over
//! TCP or TLS, behind one type the scripts run on.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::BACKGROUND_TIMEOUT;
use crate::config::RedisSettings;

/// A connection to a single Redis (reconnecting by itself) or to a Redis Cluster (connected on
/// first use, and again after a failure).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterConn>),
}

pub(super) struct ClusterConn {
    client: redis::cluster::ClusterClient,
    conn: arc_swap::ArcSwapOption<redis::cluster_async::ClusterConnection>,
}

impl Conn {
    pub(super) fn new(settings: &RedisSettings) -> redis::RedisResult<Conn> {
        let certs = settings.tls.as_ref().map(tls_certificates).transpose()?;
        if settings.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(vec![settings.url.as_str()])
                .connection_timeout(BACKGROUND_TIMEOUT / 2)
                .response_timeout(BACKGROUND_TIMEOUT)
                .retries(1);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            return Ok(Conn::Cluster(Arc::new(ClusterConn { client, conn: arc_swap::ArcSwapOption::empty() })));
        }
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(settings.url.as_str(), certs)?,
            None => redis::Client::open(settings.url.as_str())?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(BACKGROUND_TIMEOUT / 2))
            .set_response_timeout(Some(BACKGROUND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?))
    }

    /// Runs `f` on a connection; a cluster connection that failed is dropped and made again
    /// on the next call.
    pub(super) async fn run<T, F>(&self, f: F) -> redis::RedisResult<T>
    where
        F: AsyncFnOnce(&mut AnyConn) -> redis::RedisResult<T>,
    {
        match self {
            Conn::Single(c) => f(&mut AnyConn::Single(c.clone())).await,
            Conn::Cluster(c) => {
                let mut conn = AnyConn::Cluster(match c.conn.load_full() {
                    Some(conn) => (*conn).clone(),
                    None => {
                        let conn = c.client.get_async_connection().await?;
                        c.conn.store(Some(Arc::new(conn.clone())));
                        conn
                    }
                });
                let result = f(&mut conn).await;
                if result.as_ref().is_err_and(|e| e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
                    c.conn.store(None);
                }
                result
            }
        }
    }
}

/// The PEM files of `state.redis.ca` / `client_cert` + `client_key` for the redis crate's
/// rustls (already checked by config validation; read again here, at start-up only).
pub(super) fn tls_certificates(tls: &crate::config::RedisTls) -> redis::RedisResult<redis::TlsCertificates> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "cannot read a TLS file",
                format!("{}: {e}", path.display()),
            ))
        })
    };
    Ok(redis::TlsCertificates {
        root_cert: tls.ca.as_deref().map(read).transpose()?,
        client_tls: match &tls.client {
            Some((cert, key)) => Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? }),
            None => None,
        },
    })
}

/// One connection of either kind, for the scripts (`Script` needs a sized `ConnectionLike`).
pub(super) enum AnyConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }
}
