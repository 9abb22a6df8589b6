//! An in-process fake Kubernetes API server: just enough of the real one for xlb's
//! controller, spoken over real HTTP so the real `xlb` binary runs against it.
//!
//! - list and watch of Services, EndpointSlices and Nodes, with resourceVersion;
//! - watch bookmarks, and 410 Gone (as an ERROR event, as the real server sends it)
//!   for a resourceVersion older than the last `compact()`;
//! - merge patches of `services/{name}/status`, with the resourceVersion precondition;
//! - Events (events.k8s.io/v1) created and patched, kept for assertions;
//! - Leases (coordination.k8s.io/v1): get, create, replace with the resourceVersion
//!   precondition (409 on a stale one), delete.
//!
//! It listens on 127.0.0.1 inside the given network namespaces (one port, the same in
//! each), can be stopped and started again on that port, and writes a kubeconfig.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: its namespace in the store is "".
    Node,
    Lease,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Lease => "Lease",
        }
    }
}

type Key = (Kind, String, String);

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change: (resourceVersion, kind, ADDED/MODIFIED/DELETED, object).
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    events: Vec<Value>,
    status_writes: Vec<(String, String)>,
    requests: u64,
    gone_sent: u64,
    bookmarks_sent: u64,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change, to wake watches.
    changed: watch::Sender<u64>,
    bookmark_every: Duration,
    /// True: requests are read and never answered (watches already open go on), as
    /// from an API server that is overloaded or behind a stuck proxy.
    hung: watch::Sender<bool>,
}

pub struct FakeApi {
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
    /// Stops everything the current start spawned: accept loops, connections, watches.
    stop: Option<watch::Sender<bool>>,
    namespaces: Vec<String>,
    pub port: u16,
}

impl FakeApi {
    /// Starts serving on 127.0.0.1 inside each namespace, on one port.
    pub fn start(namespaces: &[&Netns]) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                events: Vec::new(),
                status_writes: Vec::new(),
                requests: 0,
                gone_sent: 0,
                bookmarks_sent: 0,
            }),
            changed: watch::channel(100).0,
            bookmark_every: Duration::from_millis(500),
            hung: watch::channel(false).0,
        });
        let mut api = FakeApi {
            shared,
            rt,
            stop: None,
            namespaces: namespaces.iter().map(|n| n.name.clone()).collect(),
            port: 0,
        };
        api.serve()?;
        Ok(api)
    }

    fn serve(&mut self) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut port = self.port;
        for ns in &self.namespaces {
            let std_listener =
                crate::netns::run_in(ns, move || -> std::io::Result<std::net::TcpListener> {
                    let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })??;
            port = std_listener.local_addr()?.port();
            let _guard = self.rt.enter();
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            self.rt
                .spawn(accept_loop(listener, self.shared.clone(), stop_rx.clone()));
        }
        self.port = port;
        self.stop = Some(stop_tx);
        Ok(())
    }

    /// From now on, every new request is read and left unanswered until `hang(false)`.
    pub fn hang(&self, hung: bool) {
        self.shared.hung.send_replace(hung);
    }

    /// Closes the listeners and every open connection and watch: the API server is down.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        // Let the tasks see it before anyone tries to connect again.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Up again, on the same port, with the same objects.
    pub fn restart(&mut self) -> Result<()> {
        self.serve()
    }

    /// A kubeconfig for this server, written into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: fake\n  user:\n    token: fake\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.port
        );
        std::fs::write(&path, text).context("writing the kubeconfig")?;
        Ok(path)
    }

    /// Creates or replaces an object (a k8s-openapi Service or EndpointSlice).
    pub fn apply<T: serde::Serialize>(&self, kind: Kind, obj: &T) -> u64 {
        let mut v = serde_json::to_value(obj).expect("serialisable object");
        let ns = if kind == Kind::Node {
            String::new()
        } else {
            v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        };
        let name = v["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let mut st = self.shared.store.lock().unwrap();
        let key = (kind, ns.clone(), name.clone());
        let ty = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if v["metadata"]["uid"].is_null() {
            v["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        }
        if v["metadata"]["creationTimestamp"].is_null() {
            let created = st
                .objects
                .get(&key)
                .map(|o| o["metadata"]["creationTimestamp"].clone())
                .unwrap_or_else(|| {
                    json!(format!(
                        "2026-01-01T00:{:02}:{:02}Z",
                        (st.rv / 60) % 60,
                        st.rv % 60
                    ))
                });
            v["metadata"]["creationTimestamp"] = created;
        }
        let rv = commit(&mut st, key, ty, v);
        drop(st);
        self.shared.changed.send_replace(rv);
        rv
    }

    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Option<u64> {
        let mut st = self.shared.store.lock().unwrap();
        let key = (kind, ns.to_owned(), name.to_owned());
        let obj = st.objects.remove(&key)?;
        st.rv += 1;
        let rv = st.rv;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push((rv, kind, "DELETED", obj));
        drop(st);
        self.shared.changed.send_replace(rv);
        Some(rv)
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let st = self.shared.store.lock().unwrap();
        st.objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets the history up to now: a watch that resumes from an older
    /// resourceVersion gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.compacted = st.rv + 1;
        st.history.clear();
    }

    /// Events created (or patched) so far.
    /// The holder of a Lease, if it exists and names one.
    pub fn lease_holder(&self, ns: &str, name: &str) -> Option<String> {
        self.get(Kind::Lease, ns, name)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }

    /// Records an Event as another controller would.
    pub fn add_event(&self, ev: Value) {
        self.shared.store.lock().unwrap().events.push(ev);
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.store.lock().unwrap().events.clone()
    }

    /// (namespace, name) of every successful status write, in order.
    pub fn status_writes(&self) -> Vec<(String, String)> {
        self.shared.store.lock().unwrap().status_writes.clone()
    }

    /// How many BOOKMARK events the watches were sent.
    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.store.lock().unwrap().bookmarks_sent
    }

    /// How many watches were answered 410 Gone.
    pub fn gone_sent(&self) -> u64 {
        self.shared.store.lock().unwrap().gone_sent
    }

    pub fn requests(&self) -> u64 {
        self.shared.store.lock().unwrap().requests
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

fn commit(st: &mut Store, key: Key, ty: &'static str, mut v: Value) -> u64 {
    st.rv += 1;
    let rv = st.rv;
    v["apiVersion"] = json!(key.0.api_version());
    v["kind"] = json!(key.0.name());
    v["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.history.push((rv, key.0, ty, v.clone()));
    st.objects.insert(key, v);
    rv
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = stop.changed() => return,
        };
        // As Go's net/http does: without it, Nagle's algorithm and delayed ACKs hold
        // small watch events back for up to 40 ms.
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let mut conn_stop = stop.clone();
        tokio::spawn(async move {
            let svc_stop = conn_stop.clone();
            let service = hyper::service::service_fn(move |req| {
                handle(req, shared.clone(), svc_stop.clone())
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            tokio::select! {
                _ = conn => {}
                _ = conn_stop.changed() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    shared.store.lock().unwrap().requests += 1;
    let mut hung = shared.hung.subscribe();
    let mut stopped = stop.clone();
    while *hung.borrow_and_update() {
        tokio::select! {
            r = hung.changed() => if r.is_err() { break },
            _ = stopped.changed() => break,
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["api", "v1", "services"]) => {
            list_or_watch(Kind::Service, &query, &shared, stop)
        }
        (&Method::GET, ["apis", "discovery.k8s.io", "v1", "endpointslices"]) => {
            list_or_watch(Kind::EndpointSlice, &query, &shared, stop)
        }
        (&Method::GET, ["api", "v1", "nodes"]) => list_or_watch(Kind::Node, &query, &shared, stop),
        (&Method::GET, ["api", "v1", "namespaces", ns, "services", name]) => {
            match shared.store.lock().unwrap().objects.get(&(
                Kind::Service,
                ns.to_string(),
                name.to_string(),
            )) {
                Some(v) => respond(StatusCode::OK, v),
                None => respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such service"),
                ),
            }
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "services", name, "status"]) => {
            patch_status(&shared, ns, name, &body)
        }
        (&Method::GET, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
            match shared.store.lock().unwrap().objects.get(&(
                Kind::Lease,
                ns.to_string(),
                name.to_string(),
            )) {
                Some(v) => respond(StatusCode::OK, v),
                None => respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("leases \"{name}\" not found")),
                ),
            }
        }
        (&Method::POST, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
            write_lease(&shared, ns, None, &body)
        }
        (&Method::PUT, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
            write_lease(&shared, ns, Some(name), &body)
        }
        (
            &Method::DELETE,
            ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name],
        ) => {
            let mut st = shared.store.lock().unwrap();
            match st
                .objects
                .remove(&(Kind::Lease, ns.to_string(), name.to_string()))
            {
                Some(v) => respond(StatusCode::OK, &v),
                None => respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such lease"),
                ),
            }
        }
        (&Method::GET, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
            let st = shared.store.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((k, n, _), _)| *k == Kind::Lease && n == ns)
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                              "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            respond(StatusCode::OK, &list)
        }
        // Events across namespaces; fieldSelector reportingController=X is honoured.
        (&Method::GET, ["apis", "events.k8s.io", "v1", "events"]) => {
            let st = shared.store.lock().unwrap();
            let selector = query.get("fieldSelector").map(|s| s.replace("%3D", "="));
            let items: Vec<Value> = st
                .events
                .iter()
                .filter(|e| {
                    match selector
                        .as_deref()
                        .and_then(|s| s.strip_prefix("reportingController="))
                    {
                        Some(c) => e["reportingController"].as_str() == Some(c),
                        None => true,
                    }
                })
                .cloned()
                .collect();
            let list = json!({"apiVersion": "events.k8s.io/v1", "kind": "EventList",
                              "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            respond(StatusCode::OK, &list)
        }
        (&Method::DELETE, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", name]) => {
            let mut st = shared.store.lock().unwrap();
            let before = st.events.len();
            st.events.retain(|e| {
                !(e["metadata"]["namespace"].as_str() == Some(ns)
                    && e["metadata"]["name"].as_str() == Some(name))
            });
            if st.events.len() < before {
                respond(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            } else {
                respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such event"),
                )
            }
        }
        (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            record_event(&shared, ns, None, &body)
        }
        (&Method::PATCH, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", name]) => {
            record_event(&shared, ns, Some(name), &body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &format!("{method} {path}")),
        ),
    };
    Ok(resp)
}

fn list_or_watch(
    kind: Kind,
    query: &BTreeMap<String, String>,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let st = shared.store.lock().unwrap();
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|(k, _)| k.0 == kind)
            .map(|(_, v)| v)
            .collect();
        let list = json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return respond(StatusCode::OK, &list);
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    tokio::spawn(watch_task(
        kind,
        from,
        timeout,
        bookmarks,
        shared.clone(),
        stop,
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let line = Bytes::from(format!("{v}\n"));
        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

async fn watch_task(
    kind: Kind,
    from: u64,
    timeout: Duration,
    bookmarks: bool,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    tx: tokio::sync::mpsc::Sender<Value>,
) {
    let mut changed = shared.changed.subscribe();
    let mut sent = from;
    {
        let mut st = shared.store.lock().unwrap();
        if from < st.compacted {
            st.gone_sent += 1;
            let msg = format!("too old resource version: {from} ({})", st.compacted);
            let _ = tx.try_send(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}));
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bookmark = tokio::time::interval(shared.bookmark_every);
    loop {
        let pending: Vec<Value> = {
            let st = shared.store.lock().unwrap();
            let out = st
                .history
                .iter()
                .filter(|(rv, k, _, _)| *k == kind && *rv > sent)
                .map(|(_, _, ty, obj)| json!({"type": ty, "object": obj}))
                .collect();
            sent = st.rv;
            out
        };
        for ev in pending {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = bookmark.tick(), if bookmarks => {
                shared.store.lock().unwrap().bookmarks_sent += 1;
                let ev = json!({"type": "BOOKMARK", "object": {
                    "kind": kind.name(), "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": sent.to_string()}}});
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = stop.changed() => return,
        }
    }
}

fn patch_status(shared: &Arc<Shared>, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "patch is not JSON"),
        );
    };
    let mut st = shared.store.lock().unwrap();
    let key = (Kind::Service, ns.to_owned(), name.to_owned());
    let Some(current) = st.objects.get(&key).cloned() else {
        return respond(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "no such service"),
        );
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
        if current["metadata"]["resourceVersion"].as_str() != Some(want) {
            let msg = "the object has been modified; please apply your changes to the latest version and try again";
            return respond(StatusCode::CONFLICT, &status(409, "Conflict", msg));
        }
    }
    // A status patch changes the status only.
    let mut updated = current.clone();
    merge(&mut updated["status"], &patch["status"]);
    st.status_writes.push((ns.to_owned(), name.to_owned()));
    commit(&mut st, key.clone(), "MODIFIED", updated);
    let out = st.objects[&key].clone();
    let rv = st.rv;
    drop(st);
    shared.changed.send_replace(rv);
    respond(StatusCode::OK, &out)
}

/// Creates (`name` None: 409 if it exists) or replaces (`name`: 409 unless the body's
/// resourceVersion is the stored one) a Lease.
fn write_lease(shared: &Arc<Shared>, ns: &str, name: Option<&str>, body: &[u8]) -> Response<Body> {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "not JSON"),
        );
    };
    let Some(lease) = v["metadata"]["name"].as_str().map(str::to_owned) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "no name"),
        );
    };
    let mut st = shared.store.lock().unwrap();
    let key = (Kind::Lease, ns.to_owned(), lease.clone());
    match (name, st.objects.get(&key)) {
        (None, Some(_)) => {
            return respond(
                StatusCode::CONFLICT,
                &status(
                    409,
                    "AlreadyExists",
                    &format!("leases \"{lease}\" already exists"),
                ),
            )
        }
        (Some(_), None) => {
            return respond(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "no such lease"),
            )
        }
        (Some(_), Some(cur)) => {
            if v["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                return respond(
                    StatusCode::CONFLICT,
                    &status(409, "Conflict", "the object has been modified"),
                );
            }
        }
        (None, None) => {}
    }
    v["metadata"]["namespace"] = json!(ns);
    let ty = if name.is_some() { "MODIFIED" } else { "ADDED" };
    commit(&mut st, key.clone(), ty, v);
    let out = st.objects[&key].clone();
    let code = if name.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    respond(code, &out)
}

fn record_event(shared: &Arc<Shared>, ns: &str, name: Option<&str>, body: &[u8]) -> Response<Body> {
    let Ok(mut ev) = serde_json::from_slice::<Value>(body) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "event is not JSON"),
        );
    };
    let mut st = shared.store.lock().unwrap();
    let n = st.events.len();
    if ev["metadata"]["name"].is_null() {
        ev["metadata"]["name"] = json!(name.map(str::to_owned).unwrap_or_else(|| format!("ev{n}")));
    }
    ev["metadata"]["namespace"] = json!(ns);
    ev["apiVersion"] = json!("events.k8s.io/v1");
    ev["kind"] = json!("Event");
    st.events.push(ev.clone());
    respond(StatusCode::CREATED, &ev)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}
