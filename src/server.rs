//! Starting the shards and the handle that stops them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};

use crate::app::application::{App, BuiltIn};
use crate::config::Config;
use crate::core::directory::MAX_SHARDS;
use crate::http::Gate;
use crate::http::auth::{AuthConfigError, Authenticator};
use crate::metrics::Metrics;
use crate::shard::{Shard, ShardParts, Shared};

/// Listen backlog of each shard's socket (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Authentication settings are unusable.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// Creating or binding a shard's listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Creating a shard's poll or thread failed.
    #[error("cannot start shard {shard}: {source}")]
    Shard {
        /// The shard.
        shard: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The cluster's broker cannot be used (unknown scheme, or its link thread cannot start).
    #[error(transparent)]
    Cluster(#[from] crate::cluster::broker::BrokerError),
    /// More shards than the directory supports.
    #[error("shards must be between 1 and {MAX_SHARDS}, got {0}")]
    TooManyShards(usize),
}

/// A running server. Dropping it shuts the server down and waits for the shards.
#[derive(Debug)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
    api: Option<crate::api::ApiServer>,
    internal: Option<crate::api::internal::InternalServer>,
    /// The cluster's broker link thread, when `cluster` is set.
    link: Option<crate::cluster::link::LinkThread>,
    /// The shards' I/O driver: `epoll` or `io_uring`.
    io_driver: &'static str,
}

/// Starts a server with the built-in behaviour only (JWT authentication, echo for
/// `generic_request`).
pub fn start(config: Config) -> Result<ServerHandle, StartError> {
    start_with(config, Arc::new(BuiltIn))
}

/// Starts a server with the application's callbacks: binds every shard's `SO_REUSEPORT`
/// listener, then runs the shards.
pub fn start_with(mut config: Config, app: App) -> Result<ServerHandle, StartError> {
    if let Some(path) = &config.api_key_file {
        config.api_key = Some(crate::http::keys::read_secret_file("api_key_file", path)?);
    }
    // With `cluster`, the node's broker link: its channels now, its thread once the shards'
    // links exist. Unset: no channel, no thread.
    let node = config.node_id.clone().unwrap_or_else(crate::cluster::default_node_id);
    let (cluster_tx, cluster_rx) = match &config.cluster {
        Some(url) => {
            log::info!("cluster node {node} on {}", without_credentials(url));
            let queue = config.cluster_queue_bytes as u64;
            let (tx, rx) =
                crate::route::cluster::cluster_channel(&node, crate::cluster::link::DATA_SLOTS, queue);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let shards = config.effective_shards();
    if shards == 0 || shards > MAX_SHARDS {
        return Err(StartError::TooManyShards(shards));
    }
    let auth = match Authenticator::from_config(&config) {
        Ok(auth) => Some(auth),
        // No secret: only an application's own authentication can admit anyone.
        Err(AuthConfigError::MissingSecret) => None,
        Err(e) => return Err(e.into()),
    };
    let listeners = bind_all(config.listen, shards)?;
    let local_addr =
        listeners[0].local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let mut parts = Vec::with_capacity(shards);
    let mut links = Vec::with_capacity(shards);
    for (shard, listener) in listeners.into_iter().enumerate() {
        let (part, link) = ShardParts::new(listener).map_err(|source| StartError::Shard { shard, source })?;
        parts.push(part);
        links.push(link);
    }
    let driver = crate::shard::choose_driver(config.io_driver, &mut parts);
    let shared = Arc::new(Shared {
        gate: Gate::new(&config, auth),
        fabric: Arc::new(crate::route::Fabric {
            links,
            ack_timeout: config.ack_timeout,
            request_timeout: config.request_timeout,
            cluster: cluster_tx,
        }),
        metrics: Metrics::new(shards),
        started: Instant::now(),
        next_seq: AtomicU64::new(1),
        app,
        occupancy: Default::default(),
        caps: crate::core::occupancy::Caps {
            total: config.max_connections,
            per_ip: config.max_connections_per_ip,
            per_user: config.max_connections_per_user,
        },
        trusted_proxies: config.trusted_proxy_ips(),
        draining: Default::default(),
        #[cfg(feature = "backend")]
        authorizer: crate::backend::Authorizer::from_config(&config),
        config,
    });
    // Bound before the shards run, so a busy `api_listen` leaves nothing running.
    let api = crate::api::start(Arc::clone(&shared))
        .map_err(|source| StartError::Bind { addr: shared.config.api_listen, source })?;
    let internal = match shared.config.internal_listen {
        Some(addr) => Some(
            crate::api::internal::start(Arc::clone(&shared), addr)
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let link = match cluster_rx {
        Some(rx) => Some(crate::cluster::link::start(&shared.config, &node, Arc::clone(&shared.fabric), rx)?),
        None => None,
    };
    let mut threads = Vec::with_capacity(shards);
    for (id, part) in parts.into_iter().enumerate() {
        let shard = Shard::new(id, Arc::clone(&shared), part);
        let thread = std::thread::Builder::new()
            .name(format!("customws-shard-{id}"))
            .spawn(move || shard.run())
            .map_err(|source| StartError::Shard { shard: id, source })?;
        threads.push(thread);
    }
    let plural = if shards == 1 { "" } else { "s" };
    log::info!(
        "listening on {local_addr} with {shards} shard{plural}, WebSocket path {}, io driver {driver}",
        shared.config.ws_path
    );
    Ok(ServerHandle { shared, local_addr, threads, api, internal, link, io_driver: driver })
}

/// One `SO_REUSEPORT` socket per shard on the same address. With port 0 the first socket
/// picks the port and the others join it.
fn bind_all(addr: SocketAddr, shards: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    if addr.port() != 0 {
        probe_exclusive(addr).map_err(|source| StartError::Bind { addr, source })?;
    }
    let mut listeners = Vec::with_capacity(shards);
    let mut addr = addr;
    for _ in 0..shards {
        let listener = bind_one(addr).map_err(|source| StartError::Bind { addr, source })?;
        if addr.port() == 0 {
            addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// `SO_REUSEPORT` would let a second customws (or anything of the same user) join the port
/// silently and take half the connections. A plain bind first fails with `EADDRINUSE` when
/// anyone listens there; the probe is closed before the shards bind.
fn probe_exclusive(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux; see the test below): no
    // `setsockopt` per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl ServerHandle {
    /// The address the shards listen on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The I/O driver the shards run: `"epoll"` or `"io_uring"` (what `io_driver` asked for,
    /// after any fallback).
    pub fn io_driver(&self) -> &'static str {
        self.io_driver
    }

    /// Begins graceful shutdown: stop accepting, close every connection with 1001, flush,
    /// exit within `shutdown_timeout`. Does not wait; see [`ServerHandle::wait`].
    pub fn shutdown(&self) {
        self.shared.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(api) = &self.api {
            api.begin_shutdown();
        }
        self.handle().shutdown();
    }

    /// Re-reads what can change without a restart (the binary does this on SIGHUP):
    /// `jwt_secret_file`, `jwt_public_key`, `jwt_keys_file` and `api_key_file`. New
    /// handshakes (and API requests) use the new keys; open connections stay. A file that
    /// cannot be used is logged and its old value kept.
    pub fn reload(&self) {
        match self.shared.gate.reload_keys() {
            Ok(Some(count)) => log::info!(keys = count; "reloaded JWT keys"),
            Ok(None) => log::info!("reload: no JWT verification configured, nothing to reload"),
            Err(e) => log::error!("reload: JWT keys unchanged: {e}"),
        }
        if let (Some(path), Some(api)) = (&self.shared.config.api_key_file, &self.api) {
            match crate::http::keys::read_secret_file("api_key_file", path) {
                Ok(key) => {
                    api.set_key(&key);
                    log::info!("reloaded api_key_file");
                }
                Err(e) => log::error!("reload: API key unchanged: {e}"),
            }
        }
    }

    /// Waits for every shard to finish (after [`ServerHandle::shutdown`], or forever).
    pub fn wait(mut self) {
        self.join();
    }

    /// The backend HTTP API's address, when `api_key` is configured.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(crate::api::ApiServer::local_addr)
    }

    /// The internal listener's address (`/metrics`, `/health`, `/ready`), when
    /// `internal_listen` is configured.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().map(crate::api::internal::InternalServer::local_addr)
    }

    /// A handle for server-initiated operations, usable from any thread.
    pub fn handle(&self) -> crate::app::Handle {
        crate::app::Handle::new(Arc::clone(&self.shared.fabric))
    }

    /// Prometheus text of the server's counters.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render_with(self.shared.counters())
    }

    fn join(&mut self) {
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a shard thread panicked");
            }
        }
        if let Some(mut api) = self.api.take() {
            api.shutdown();
        }
        if let Some(mut internal) = self.internal.take() {
            internal.shutdown();
        }
        if let Some(mut link) = self.link.take() {
            if let Some(cluster) = &self.shared.fabric.cluster {
                cluster.send_state(crate::route::cluster::LinkMsg::Shutdown);
            }
            link.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            self.join();
        }
    }
}

/// `scheme://user:password@host:port/db` without the `user:password@` part, for logs.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            format!("{scheme}://{}", rest.rsplit_once('@').map_or(rest, |(_, host)| host))
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no connection to accept");
                    std::thread::yield_now();
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        // getsockopt(TCP_NODELAY) on the accepted socket, which nobody set it on.
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is not inherited: set it per connection");
    }
}
