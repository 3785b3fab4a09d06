//! A three-node JetStream cluster on loopback, owned by a guard: nodes killed and restarted on their own ports and stores.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::nats_server_bin;

/// How many nodes the cluster has.
pub const NODES: usize = 3;

/// One node: its ports (kept across restarts) and its process.
struct Node {
    name: String,
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    /// Where leaf nodes (sites) connect.
    leaf_port: u16,
    child: Option<Child>,
}

/// Three `nats-server` processes (`n1`, `n2`, `n3`) with JetStream, routed
/// to each other on loopback, each with its own store and log under one
/// temp folder; killed on drop (the folder goes with the guard).
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until the cluster has a JetStream
    /// meta leader (a JetStream API request is answered), so streams can
    /// be created at once.
    ///
    /// Routes ping every second, three outstanding (as docs/operations.md
    /// recommends): a hung node is dropped in about 4 s, not minutes.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("cluster dir");
        // All twelve ports are held at once while they are chosen, so they
        // differ; they are fixed in the configuration files because every
        // node names the others' route ports, and a restart keeps them.
        let held: Vec<TcpListener> =
            (0..NODES * 4).map(|_| TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().expect("local addr").port()).collect();
        let nodes: Vec<Node> = (0..NODES)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client_port: ports[4 * i],
                route_port: ports[4 * i + 1],
                monitor_port: ports[4 * i + 2],
                leaf_port: ports[4 * i + 3],
                child: None,
            })
            .collect();
        let routes: Vec<String> =
            nodes.iter().map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.route_port)).collect();
        for node in &nodes {
            let store = dir.path().join(&node.name);
            std::fs::create_dir_all(&store).expect("store dir");
            let config = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 jetstream {{ store_dir: {store:?}, domain: hub }}\n\
                 cluster {{ name: harmony, listen: 127.0.0.1:{route}, routes: [{routes}], \
                 ping_interval: \"1s\", ping_max: 3 }}\n\
                 leafnodes {{ listen: 127.0.0.1:{leaf} }}\n",
                name = node.name,
                client = node.client_port,
                monitor = node.monitor_port,
                route = node.route_port,
                leaf = node.leaf_port,
                routes = routes.join(", "),
            );
            std::fs::write(dir.path().join(format!("{}.conf", node.name)), config).expect("node config");
        }
        drop(held);
        let mut cluster = Self { nodes, dir };
        for node in 0..NODES {
            cluster.spawn(node);
        }
        cluster.until_meta_leader().await;
        cluster
    }

    /// The client URLs of all three nodes (what an agent's `nats` lists).
    pub fn urls(&self) -> Vec<String> {
        (0..NODES).map(|i| self.url(i)).collect()
    }

    /// The client URL of node `node` (0-based) alone.
    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].client_port)
    }

    /// The server name of node `node` (`n1` for 0).
    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// The node whose server name is `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whether node `node` runs.
    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].child.is_some()
    }

    /// Kills node `node` with SIGKILL (a crash: no leadership handed over)
    /// and reaps it; its store stays.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `node` with SIGSTOP: a hung server. Its connections stay
    /// open and nothing on them is answered; its peers drop it when their
    /// route pings go unanswered. [`NatsCluster::kill`] still ends it.
    pub fn freeze(&mut self, node: usize) {
        if let Some(child) = &self.nodes[node].child {
            let status = Command::new("kill").args(["-STOP", &child.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "cannot stop node {node}");
        }
    }

    /// Starts node `node` again on its ports with its store, and waits
    /// until it accepts clients (not until it caught up: see
    /// [`NatsCluster::until_replicas_current`]).
    pub fn restart(&mut self, node: usize) {
        self.kill(node);
        self.spawn(node);
    }

    /// The node's log so far (for assertion messages).
    pub fn log_text(&self, node: usize) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    fn log_path(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.nodes[node].name))
    }

    fn spawn(&mut self, node: usize) {
        let config = self.dir.path().join(format!("{}.conf", self.nodes[node].name));
        let log = self.log_path(node);
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&config)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let port = self.nodes[node].client_port;
        self.nodes[node].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self.nodes[node].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "node {node} exited: {exited:?}\n{}", self.log_text(node));
            assert!(Instant::now() < deadline, "node {node} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 30 s) until a JetStream API request through any node
    /// is answered: a clustered server answers only once a meta leader is
    /// elected.
    async fn until_meta_leader(&self) {
        let client = crate::within(async_nats::connect(self.urls())).await.expect("connect to the cluster");
        let js = jetstream::new(client);
        let deadline = Instant::now() + crate::WAIT;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), js.query_account()).await {
                Ok(Ok(_)) => return,
                other => assert!(Instant::now() < deadline, "no JetStream meta leader: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node that leads stream `stream` now, from its info
    /// (`$JS.API.STREAM.INFO.<stream>` → `cluster.leader`); `None` while
    /// it has no leader (an election in progress) or the request fails.
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> Option<usize> {
        let info = tokio::time::timeout(Duration::from_secs(5), async {
            js.get_stream_no_info(stream).await.ok()?.get_info().await.ok()
        })
        .await
        .ok()??;
        self.node_named(info.cluster?.leader.as_deref()?)
    }

    /// Waits (at most [`crate::WAIT`]) until stream `stream` has a leader and
    /// returns it.
    pub async fn until_stream_leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        let deadline = Instant::now() + crate::WAIT;
        loop {
            if let Some(node) = self.stream_leader(js, stream).await {
                return node;
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (at most [`crate::WAIT`]) until stream `stream` has a leader and
    /// every other replica is current with no lag (after a restart: the
    /// node caught up), and returns the stream's info.
    pub async fn until_replicas_current(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> jetstream::stream::Info {
        let deadline = Instant::now() + crate::WAIT;
        let mut last = None;
        loop {
            let info = tokio::time::timeout(Duration::from_secs(5), async {
                js.get_stream_no_info(stream).await.ok()?.get_info().await.ok()
            })
            .await
            .ok()
            .flatten();
            if let Some(info) = info {
                let caught_up = info.cluster.as_ref().is_some_and(|c| {
                    c.leader.is_some()
                        && c.replicas.len() == NODES - 1
                        && c.replicas.iter().all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0)
                });
                if caught_up {
                    return info;
                }
                last = Some(info.cluster);
            }
            assert!(Instant::now() < deadline, "replicas of {stream} not current: {last:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The names of the client connections node `node` holds now (from its
    /// monitoring endpoint `/connz`): which node an agent is connected to.
    pub fn connection_names(&self, node: usize) -> Vec<String> {
        let Some(body) = http_get(self.nodes[node].monitor_port, "/connz?limit=1024") else {
            return Vec::new();
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else {
            return Vec::new();
        };
        value["connections"]
            .as_array()
            .map(|conns| conns.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// The node holding a client connection named `name`, if any.
    pub fn node_of_connection(&self, name: &str) -> Option<usize> {
        (0..NODES)
            .filter(|n| self.is_running(*n))
            .find(|n| self.connection_names(*n).iter().any(|c| c == name))
    }

    /// Starts a leaf node named `name` (a site's local server), connected
    /// to the leaf port of every hub node (it attaches to one, and to
    /// another when that one is lost), without JetStream of its own: the
    /// JetStream API requests of its clients (direct gets, status writes)
    /// reach the hub's streams through it. Waits until it is attached.
    pub fn start_leaf(&self, name: &str) -> LeafNode {
        let dir = tempfile::tempdir().expect("leaf dir");
        let held = TcpListener::bind("127.0.0.1:0").expect("free port");
        let port = held.local_addr().expect("local addr").port();
        let remotes: Vec<String> =
            self.nodes.iter().map(|n| format!("\"nats-leaf://127.0.0.1:{}\"", n.leaf_port)).collect();
        let config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
             mappings: {{ \"$JS.API.>\": \"$JS.hub.API.>\", \"$KV.>\": \"$JS.hub.API.$KV.>\" }}\n\
             leafnodes {{ reconnect: \"1s\", remotes: [ {{ urls: [{}] }} ] }}\n",
            remotes.join(", ")
        );
        let path = dir.path().join("leaf.conf");
        std::fs::write(&path, config).expect("leaf config");
        drop(held);
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&path)
            .arg("-l")
            .arg(dir.path().join("leaf.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the leaf node");
        let leaf = LeafNode { child: Some(child), port, name: name.to_owned(), dir };
        let deadline = Instant::now() + crate::WAIT;
        while self.node_of_leaf(name).is_none() {
            assert!(Instant::now() < deadline, "leaf {name} did not attach\n{}", leaf.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        leaf
    }

    /// The hub node the leaf node `name` is attached to, from the nodes'
    /// monitoring endpoint `/leafz`.
    pub fn node_of_leaf(&self, name: &str) -> Option<usize> {
        (0..NODES).filter(|n| self.is_running(*n)).find(|n| {
            http_get(self.nodes[*n].monitor_port, "/leafz")
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v["leafs"].as_array().cloned())
                .is_some_and(|leafs| leafs.iter().any(|l| l["name"].as_str() == Some(name)))
        })
    }

    /// The folder holding the nodes' configurations, stores and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A leaf node started by [`NatsCluster::start_leaf`], killed on drop.
pub struct LeafNode {
    child: Option<Child>,
    port: u16,
    name: String,
    dir: tempfile::TempDir,
}

impl LeafNode {
    /// `nats://127.0.0.1:<port>`: where the site's devices connect.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its server name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("leaf.log")).unwrap_or_default()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for LeafNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The body of `GET path` on a loopback monitoring port (HTTP/1.0: the
/// server closes the connection after the answer).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in 0..NODES {
            self.kill(node);
        }
    }
}
