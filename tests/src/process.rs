//! Real processes for end-to-end tests: the workspace's service binaries on ephemeral
//! loopback ports, and a redis-server. Everything started here is killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;

/// A workspace binary next to the running test (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/TEST-HASH -> target/<profile>/NAME
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the workspace binaries first (cargo build --bins)", path.display());
    path
}

/// A service process, killed when dropped.
pub struct Service {
    pub child: Child,
    /// `http://127.0.0.1:PORT` of its gRPC API.
    pub addr: String,
    /// `127.0.0.1:PORT` of its Prometheus endpoint, when started with `--metrics-listen`.
    pub metrics: Option<String>,
    /// `127.0.0.1:PORT` of its HTTP/JSON API, when started with `--http-listen`.
    pub http: Option<String>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Sends SIGTERM (the way Kubernetes stops a pod).
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit on its own, for at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process {} did not exit within {timeout:?}", self.child.id());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus text it serves now.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.as_deref().expect("started without --metrics-listen");
        http_get(addr, "/metrics")
    }
}

/// Starts `name` with `args` plus `--listen 127.0.0.1:0` and `envs`, and reads the address
/// it printed (and the metrics address, when it serves metrics). Its log goes to stderr.
pub fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Service {
    start_listening(name, args, envs, "127.0.0.1:0")
}

/// [`start`], listening on `listen`.
pub fn start_listening(name: &str, args: &[&str], envs: &[(&str, &str)], listen: &str) -> Service {
    let mut command = Command::new(bin(name));
    command.args(args).args(["--listen", listen]).env("RUST_LOG", "warn").envs(envs.iter().copied());
    spawn_service(name, command)
}

/// [`start`] with `--log-format json`, its log filtered by `rust_log`: each log line it writes,
/// parsed, comes through the receiver.
pub fn start_with_json_log(
    name: &str,
    args: &[&str],
    rust_log: &str,
) -> (Service, std::sync::mpsc::Receiver<serde_json::Value>) {
    let mut command = Command::new(bin(name));
    command
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", rust_log)
        .stderr(Stdio::piped());
    let mut service = spawn_service(name, command);
    let stderr = BufReader::new(service.child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let parsed =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            if tx.send(parsed).is_err() {
                return;
            }
        }
    });
    (service, rx)
}

/// Spawns `command` and reads the addresses it prints, up to `listening on ADDR`.
fn spawn_service(name: &str, mut command: Command) -> Service {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut metrics, mut http) = (None, None);
    let addr = loop {
        let line = lines.next().unwrap_or_else(|| panic!("{name} exited before listening")).unwrap();
        if let Some(addr) = line.strip_prefix("metrics on ") {
            metrics = Some(addr.to_string());
        } else if let Some(addr) = line.strip_prefix("http api on ") {
            http = Some(addr.to_string());
        } else if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_string();
        }
    };
    // Keep reading stdout so the process never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    Service { child, addr: format!("http://{addr}"), metrics, http }
}

/// The health status `url` reports now (None: not reachable).
pub async fn health(url: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).ok()?.connect().await.ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(r.into_inner().status)
}

/// Waits (up to a minute) until `url` reports SERVING.
pub async fn wait_serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while health(url).await != Some(ServingStatus::Serving as i32) {
        assert!(Instant::now() < deadline, "{url} did not become SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// text-encoder, unet, vae and orchestrator (and depth, for a depth checkpoint), each its own
/// process.
pub struct Mesh {
    pub orchestrator: Service,
    pub text_encoder: Service,
    pub unet: Service,
    pub vae: Service,
    pub depth: Option<Service>,
}

/// Options for [`Mesh::start`].
#[derive(Default, Clone)]
pub struct MeshOptions<'a> {
    /// Arguments every process gets (e.g. `--metrics-listen 127.0.0.1:0`).
    pub common_args: Vec<&'a str>,
    /// Arguments the orchestrator alone gets.
    pub orchestrator_args: Vec<&'a str>,
    /// Environment of every process.
    pub envs: Vec<(&'a str, &'a str)>,
}

impl Mesh {
    pub async fn start(model_name: &str) -> Mesh {
        Self::start_with(model_name, &MeshOptions::default()).await
    }

    pub async fn start_with(model_name: &str, opts: &MeshOptions<'_>) -> Mesh {
        let dir = crate::model(model_name);
        let dir = dir.to_str().unwrap();
        let model_service = |name: &str| {
            let mut args = vec!["--model", dir];
            args.extend(&opts.common_args);
            start(name, &args, &opts.envs)
        };
        let text_encoder = model_service("sdmesh-text-encoder");
        let unet = model_service("sdmesh-unet");
        let vae = model_service("sdmesh-vae");
        let depth = std::path::Path::new(dir).join("depth_estimator").is_dir().then(|| model_service("sdmesh-depth"));
        for s in [&text_encoder, &unet, &vae].into_iter().chain(depth.as_ref()) {
            wait_serving(&s.addr).await;
        }
        let mut opts = opts.clone();
        if let Some(d) = &depth {
            opts.orchestrator_args.extend(["--depth-url", d.addr.as_str()]);
        }
        let orchestrator = Self::start_orchestrator(dir, &text_encoder, &unet.addr, &vae, &opts).await;
        Mesh { orchestrator, text_encoder, unet, vae, depth }
    }

    /// Another orchestrator over this mesh's model services.
    pub async fn another_orchestrator(&self, model_name: &str, opts: &MeshOptions<'_>) -> Service {
        self.orchestrator_over_unet(model_name, &self.unet.addr, opts).await
    }

    /// Another orchestrator over this mesh's text encoder and vae, and the unet replicas
    /// `unet` names (an `--unet-url` value).
    pub async fn orchestrator_over_unet(&self, model_name: &str, unet: &str, opts: &MeshOptions<'_>) -> Service {
        let dir = crate::model(model_name);
        Self::start_orchestrator(dir.to_str().unwrap(), &self.text_encoder, unet, &self.vae, opts).await
    }

    async fn start_orchestrator(dir: &str, te: &Service, unet: &str, vae: &Service, opts: &MeshOptions<'_>) -> Service {
        let mut args = vec!["--model", dir, "--text-encoder-url", &te.addr, "--unet-url", unet];
        args.extend(["--vae-url", &vae.addr]);
        args.extend(&opts.common_args);
        args.extend(&opts.orchestrator_args);
        let orchestrator = start("sdmesh-orchestrator", &args, &opts.envs);
        wait_serving(&orchestrator.addr).await;
        orchestrator
    }
}

/// GET `path` from `addr` (host:port) over plain HTTP/1.1; the body (the status must be 200).
pub fn http_get(addr: &str, path: &str) -> String {
    let response = http_request(addr, "GET", path, &[], b"");
    assert_eq!(response.status, 200, "GET {path}: {}", String::from_utf8_lossy(&response.body));
    String::from_utf8(response.body).expect("a UTF-8 body")
}

/// An HTTP/1.1 response: status, headers (names lower-cased) and body (de-chunked).
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `method path` with `headers` and `body` to `addr` (host:port) over plain HTTP/1.1 and
/// reads the whole response (the connection closes after it).
pub fn http_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break body;
            }
            body.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 4 + size..];
        }
    } else {
        rest.to_vec()
    };
    HttpResponse { status, headers, body }
}

/// The value of the Prometheus sample `name{labels}` whose labels include all of `labels`
/// (summed over the matching series); 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric_name == name
                && labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A redis-server of its own on a free loopback port, without persistence; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Starts redis-server from PATH (`make test` installs it where missing).
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { child: None, port };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts it on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e} (install it: apt-get install redis-server; make test does)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not answer PING");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it hard (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends one command (RESP) and returns the first line of the reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        use std::io::Write;
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            request.extend(format!("${}\r\n", a.len()).as_bytes());
            request.extend(a.as_bytes());
            request.extend(b"\r\n");
        }
        stream.write_all(&request).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
