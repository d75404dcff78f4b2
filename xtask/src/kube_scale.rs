//! `cargo xtask bench --only kube`: the agent's memory for a large cluster's names.
//!
//! A replay API server on 127.0.0.1 answers the agent's list and watch requests the way a
//! kube-apiserver does (pages of `limit` objects with a `continue` token, metadata-only lists
//! for `Accept: ...PartialObjectMetadataList`, watches held open) with synthetic objects of
//! realistic size: pods with managedFields, probes, volumes and container statuses, grouped in
//! ReplicaSets that share their labels. The real agent binary lists them into its name store;
//! its resident memory is compared with the same agent without Kubernetes and with an empty API.
//! The lab's own two pods and Service are among the objects, and a real connection must come
//! out named, so the figure is that of a store that works.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use observer_lab::drive::{LabRun, unique_name};

/// What the replayed cluster holds.
#[derive(Clone, Copy, Debug)]
pub struct Cluster {
    pub pods: usize,
    pub nodes: usize,
    pub services: usize,
    pub namespaces: usize,
}

/// Pods per ReplicaSet: replicas share their labels (and `pod-template-hash`).
const REPLICAS: usize = 5;
const PAGE_DEFAULT: usize = 500;

/// The lab's pods and Service, named so the bench can check a real record.
const LAB_OBJECTS: [(&str, &str, &str); 2] = [
    ("scale-client", "10.244.1.10", "node-a"),
    ("scale-server", "10.244.2.10", "node-b"),
];

fn pod_ip(i: usize) -> String {
    if let Some((_, ip, _)) = LAB_OBJECTS.get(i) {
        return (*ip).to_owned();
    }
    format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255)
}

fn namespace(i: usize, c: &Cluster) -> String {
    format!("team-{:04}", i % c.namespaces)
}

fn hex(seed: usize, len: usize) -> String {
    let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x & 15) as u32, 16).unwrap()
        })
        .collect()
}

fn pod_json(i: usize, c: &Cluster) -> String {
    let rs = i / REPLICAS;
    let (name, ns, node, app) = match LAB_OBJECTS.get(i) {
        Some((n, _, node)) => (
            (*n).to_owned(),
            "scale".to_owned(),
            (*node).to_owned(),
            (*n).to_owned(),
        ),
        None => {
            let app = format!("svc{:05}", rs % 20_000);
            let hash = hex(rs, 10);
            (
                format!("{app}-{hash}-{}", hex(i, 5)),
                namespace(rs, c),
                format!("node-{:04}", i % c.nodes),
                app,
            )
        }
    };
    let hash = hex(rs, 10);
    let ip = pod_ip(i);
    let host = format!("192.168.{}.{}", (i % c.nodes) >> 8, (i % c.nodes) & 255);
    let ts = "2026-11-01T10:00:00Z";
    let uid = format!(
        "{}-{}-4{}-a{}-{}",
        hex(i, 8),
        hex(i + 1, 4),
        hex(i + 2, 3),
        hex(i + 3, 3),
        hex(i + 4, 12)
    );
    let fields_spec = r#"{"f:metadata":{"f:generateName":{},"f:labels":{".":{},"f:app.kubernetes.io/instance":{},"f:app.kubernetes.io/name":{},"f:app.kubernetes.io/version":{},"f:pod-template-hash":{},"f:tier":{}},"f:ownerReferences":{".":{},"k:{\"uid\":\"x\"}":{}}},"f:spec":{"f:containers":{"k:{\"name\":\"app\"}":{".":{},"f:env":{".":{},"k:{\"name\":\"LOG_LEVEL\"}":{".":{},"f:name":{},"f:value":{}}},"f:image":{},"f:imagePullPolicy":{},"f:livenessProbe":{".":{},"f:httpGet":{".":{},"f:path":{},"f:port":{},"f:scheme":{}}},"f:name":{},"f:ports":{".":{},"k:{\"containerPort\":8080,\"protocol\":\"TCP\"}":{".":{},"f:containerPort":{},"f:name":{},"f:protocol":{}}},"f:resources":{".":{},"f:limits":{".":{},"f:cpu":{},"f:memory":{}},"f:requests":{".":{},"f:cpu":{},"f:memory":{}}}}},"f:dnsPolicy":{},"f:enableServiceLinks":{},"f:restartPolicy":{},"f:schedulerName":{},"f:securityContext":{},"f:terminationGracePeriodSeconds":{}}}"#;
    let fields_status = r#"{"f:status":{"f:conditions":{"k:{\"type\":\"ContainersReady\"}":{".":{},"f:lastProbeTime":{},"f:lastTransitionTime":{},"f:status":{},"f:type":{}},"k:{\"type\":\"Initialized\"}":{".":{},"f:lastProbeTime":{},"f:lastTransitionTime":{},"f:status":{},"f:type":{}},"k:{\"type\":\"Ready\"}":{".":{},"f:lastProbeTime":{},"f:lastTransitionTime":{},"f:status":{},"f:type":{}}},"f:containerStatuses":{},"f:hostIP":{},"f:phase":{},"f:podIP":{},"f:podIPs":{".":{},"k:{\"ip\":\"x\"}":{".":{},"f:ip":{}}},"f:startTime":{}}}"#;
    let conditions: String = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        .iter()
        .map(|t| {
            format!(
                r#"{{"type":"{t}","status":"True","lastProbeTime":null,"lastTransitionTime":"{ts}"}}"#
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"{{"metadata":{{"name":"{name}","generateName":"{app}-{hash}-","namespace":"{ns}","uid":"{uid}","resourceVersion":"{rv}","creationTimestamp":"{ts}","labels":{{"app.kubernetes.io/name":"{app}","app.kubernetes.io/instance":"{app}-prod","app.kubernetes.io/version":"1.{v}.0","pod-template-hash":"{hash}","tier":"backend"}},"annotations":{{"kubectl.kubernetes.io/restartedAt":"{ts}","prometheus.io/scrape":"true","prometheus.io/port":"9090"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{app}-{hash}","uid":"{uid}","controller":true,"blockOwnerDeletion":true}}],"managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"{ts}","fieldsType":"FieldsV1","fieldsV1":{fields_spec}}},{{"manager":"kubelet","operation":"Update","apiVersion":"v1","time":"{ts}","fieldsType":"FieldsV1","fieldsV1":{fields_status},"subresource":"status"}}]}},"spec":{{"volumes":[{{"name":"kube-api-access-{sfx}","projected":{{"sources":[{{"serviceAccountToken":{{"expirationSeconds":3607,"path":"token"}}}},{{"configMap":{{"name":"kube-root-ca.crt","items":[{{"key":"ca.crt","path":"ca.crt"}}]}}}},{{"downwardAPI":{{"items":[{{"path":"namespace","fieldRef":{{"apiVersion":"v1","fieldPath":"metadata.namespace"}}}}]}}}}],"defaultMode":420}}}}],"containers":[{{"name":"app","image":"registry.example/{app}:1.{v}.0","ports":[{{"name":"http","containerPort":8080,"protocol":"TCP"}},{{"name":"metrics","containerPort":9090,"protocol":"TCP"}}],"env":[{{"name":"LOG_LEVEL","value":"info"}},{{"name":"POD_NAME","valueFrom":{{"fieldRef":{{"apiVersion":"v1","fieldPath":"metadata.name"}}}}}}],"resources":{{"limits":{{"cpu":"500m","memory":"512Mi"}},"requests":{{"cpu":"100m","memory":"128Mi"}}}},"volumeMounts":[{{"name":"kube-api-access-{sfx}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}],"livenessProbe":{{"httpGet":{{"path":"/healthz","port":8080,"scheme":"HTTP"}},"timeoutSeconds":1,"periodSeconds":10,"successThreshold":1,"failureThreshold":3}},"readinessProbe":{{"httpGet":{{"path":"/ready","port":8080,"scheme":"HTTP"}},"timeoutSeconds":1,"periodSeconds":5,"successThreshold":1,"failureThreshold":3}},"terminationMessagePath":"/dev/termination-log","terminationMessagePolicy":"File","imagePullPolicy":"IfNotPresent"}}],"restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","serviceAccountName":"default","serviceAccount":"default","nodeName":"{node}","securityContext":{{}},"schedulerName":"default-scheduler","tolerations":[{{"key":"node.kubernetes.io/not-ready","operator":"Exists","effect":"NoExecute","tolerationSeconds":300}},{{"key":"node.kubernetes.io/unreachable","operator":"Exists","effect":"NoExecute","tolerationSeconds":300}}],"priority":0,"enableServiceLinks":true,"preemptionPolicy":"PreemptLowerPriority"}},"status":{{"phase":"Running","conditions":[{conditions}],"hostIP":"{host}","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"startTime":"{ts}","containerStatuses":[{{"name":"app","state":{{"running":{{"startedAt":"{ts}"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"registry.example/{app}:1.{v}.0","imageID":"registry.example/{app}@sha256:{digest}","containerID":"containerd://{cid}","started":true}}],"qosClass":"Burstable"}}}}"#,
        rv = 1000 + i,
        v = rs % 7,
        sfx = hex(i, 5),
        digest = hex(rs + 7, 64),
        cid = hex(i + 11, 64),
    )
}

fn service_json(i: usize, c: &Cluster) -> String {
    let (name, ns, ip) = if i == 0 {
        (
            "scale-web".to_owned(),
            "scale".to_owned(),
            "100.64.0.10".to_owned(),
        )
    } else {
        (
            format!("svc{:05}", i % 20_000),
            namespace(i, c),
            format!("100.{}.{}.{}", 65 + (i >> 16), (i >> 8) & 255, i & 255),
        )
    };
    format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"{ns}","uid":"{uid}","resourceVersion":"{rv}","creationTimestamp":"2026-11-01T10:00:00Z","labels":{{"app.kubernetes.io/name":"{name}"}}}},"spec":{{"ports":[{{"name":"https","protocol":"TCP","port":443,"targetPort":8443}},{{"name":"metrics","protocol":"TCP","port":9090,"targetPort":"metrics"}}],"selector":{{"app.kubernetes.io/name":"{name}"}},"clusterIP":"{ip}","clusterIPs":["{ip}"],"type":"ClusterIP","sessionAffinity":"None","ipFamilies":["IPv4"],"ipFamilyPolicy":"SingleStack","internalTrafficPolicy":"Cluster"}},"status":{{"loadBalancer":{{}}}}}}"#,
        uid = hex(i + 99, 32),
        rv = 500 + i,
    )
}

fn namespace_meta_json(i: usize, c: &Cluster) -> String {
    let name = if i == 0 {
        "scale".to_owned()
    } else {
        namespace(i, c)
    };
    format!(
        r#"{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{{"name":"{name}","uid":"{}","resourceVersion":"{}","creationTimestamp":"2026-11-01T10:00:00Z","labels":{{"kubernetes.io/metadata.name":"{name}","team":"t{}"}}}}}}"#,
        hex(i + 77, 32),
        100 + i,
        i % 50,
    )
}

/// Served bytes and pages, per kind.
#[derive(Default)]
pub struct Served {
    pub bytes: AtomicU64,
    pub pages: AtomicU64,
}

pub struct ReplayApi {
    pub port: u16,
    pub served: Arc<Served>,
    stop: Arc<AtomicBool>,
}

impl ReplayApi {
    pub fn start(c: Cluster) -> anyhow::Result<ReplayApi> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the replay API")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(Served::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (served.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, st) = (s.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, c, &s, &st);
                });
            }
        });
        Ok(ReplayApi { port, served, stop })
    }

    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: replay\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: bench\n  user:\n    token: bench\ncontexts:\n- name: replay\n  context:\n    cluster: replay\n    user: bench\ncurrent-context: replay\n",
            self.port
        )
    }
}

impl Drop for ReplayApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn query<'a>(q: &'a str, key: &str) -> Option<&'a str> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// One keep-alive connection: list pages until the client holds a watch, which stays open.
fn serve(conn: TcpStream, c: Cluster, served: &Served, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut metadata_only = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if h.to_ascii_lowercase().starts_with("accept:") && h.contains("PartialObjectMetadata")
            {
                metadata_only = true;
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        let (path, q) = target.split_once('?').unwrap_or((target, ""));
        if query(q, "watch").is_some_and(|w| w == "true" || w == "1") {
            out.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            )?;
            out.flush()?;
            // Nothing changes in this cluster: hold the watch until the agent goes.
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                }
            }
            return Ok(());
        }
        let limit = query(q, "limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(PAGE_DEFAULT);
        let from: usize = query(q, "continue")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let (kind, total, item): (&str, usize, fn(usize, &Cluster) -> String) = match path {
            "/api/v1/pods" => ("PodList", c.pods, pod_json),
            "/api/v1/services" => ("ServiceList", c.services, service_json),
            "/api/v1/namespaces" if metadata_only => (
                "PartialObjectMetadataList",
                c.namespaces,
                namespace_meta_json,
            ),
            _ => {
                let body = format!(
                    "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"message\":\"replay: {path} not served\",\"reason\":\"NotFound\",\"code\":404}}"
                );
                write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                continue;
            }
        };
        let to = (from + limit).min(total);
        let items: Vec<String> = (from..to).map(|i| item(i, &c)).collect();
        let cont = if to < total {
            format!(
                ",\"continue\":\"{to}\",\"remainingItemCount\":{}",
                total - to
            )
        } else {
            String::new()
        };
        let api_version = if metadata_only {
            "meta.k8s.io/v1"
        } else {
            "v1"
        };
        let body = format!(
            "{{\"kind\":\"{kind}\",\"apiVersion\":\"{api_version}\",\"metadata\":{{\"resourceVersion\":\"999999\"{cont}}},\"items\":[{}]}}",
            items.join(",")
        );
        served.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        served.pages.fetch_add(1, Ordering::Relaxed);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        out.write_all(body.as_bytes())?;
    }
}

struct Run {
    rss_kib: u64,
    peak_kib: u64,
    listed_in: Duration,
}

/// Start an agent on node-a (against `api`, if any), wait until it has listed every pod, and
/// read its memory after it settled.
fn measure(lab: &mut LabRun, api: Option<&ReplayApi>, pods: usize) -> anyhow::Result<Run> {
    let mut args = vec!["--no-pin".to_owned(), "--idle-timeout".into(), "2s".into()];
    if let Some(api) = api {
        let path = lab.dir.join(format!("kubeconfig-{}", api.port));
        std::fs::write(&path, api.kubeconfig())?;
        args.push("--kubeconfig".into());
        args.push(path.to_string_lossy().into_owned());
    }
    let t0 = Instant::now();
    lab.start_agent(
        "node-a",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let agent = lab.agents.last().expect("just started");
    let pid = agent.child.id();
    let log = agent.log.clone();
    let want = format!("pods listed ({pods} of them");
    let mut listed_in = Duration::ZERO;
    if api.is_some() {
        loop {
            if std::fs::read_to_string(&log)?.contains(&want) {
                listed_in = t0.elapsed();
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!(
                    "the agent did not list {pods} pods in 10 min: see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let (rss_kib, peak_kib) = crate::proc::memory_kib(pid);
    Ok(Run {
        rss_kib,
        peak_kib,
        listed_in,
    })
}

/// A real connection from the lab's pod-a must come out with the replayed names.
fn check_names(lab: &LabRun) -> anyhow::Result<()> {
    let s = lab.client("pod-a", &["--to", "100.64.0.10:443"])?;
    if s["ok"] != 1 {
        bail!("lab connection failed: {s}");
    }
    let recs = lab.wait_records("node-a", Duration::from_secs(15), |rs| {
        rs.iter()
            .any(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443)
    })?;
    let r = recs
        .iter()
        .rfind(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443)
        .context("no record")?;
    if r["src_pod"]["name"] != "scale-client"
        || r["dst_pod"]["name"] != "scale-server"
        || r["service"]["name"] != "scale-web"
    {
        bail!("names at scale are wrong: {r}");
    }
    Ok(())
}

pub fn run(c: Cluster) -> anyhow::Result<String> {
    let bins = crate::bins();
    let name = unique_name("kscale");
    let dir = crate::workspace_root().join("target/bench").join(&name);
    let mut lab = LabRun::up(&bins, &name, None, &dir)?;
    println!(
        "==> Kubernetes names: agent without Kubernetes, with an empty API, with {} pods",
        c.pods
    );
    let none = measure(&mut lab, None, 0)?;
    lab.stop_agent("node-a")?;
    let empty_api = ReplayApi::start(Cluster {
        pods: 0,
        services: 0,
        namespaces: 0,
        ..c
    })?;
    let empty = measure(&mut lab, Some(&empty_api), 0)?;
    lab.stop_agent("node-a")?;
    drop(empty_api);
    let api = ReplayApi::start(c)?;
    let full = measure(&mut lab, Some(&api), c.pods)?;
    check_names(&lab)?;
    lab.stop_agent("node-a")?;
    let served_mib = api.served.bytes.load(Ordering::Relaxed) as f64 / 1048576.0;
    let pages = api.served.pages.load(Ordering::Relaxed);
    drop(lab);

    let mib = |k: u64| k as f64 / 1024.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n  Kubernetes names (replayed API: {} pods on {} nodes in ReplicaSets of {REPLICAS}, {} Services, {} namespaces;\n  {served_mib:.0} MiB of JSON in {pages} pages of {PAGE_DEFAULT})",
        c.pods, c.nodes, c.services, c.namespaces
    );
    let _ = writeln!(
        out,
        "  agent                      RSS          peak (VmHWM)   listed in"
    );
    for (what, r) in [
        ("no Kubernetes".to_owned(), &none),
        ("empty API".to_owned(), &empty),
        (format!("{} pods", c.pods), &full),
    ] {
        let _ = writeln!(
            out,
            "  {what:<24} {:>7.1} MiB    {:>7.1} MiB    {:>6.1} s",
            mib(r.rss_kib),
            mib(r.peak_kib),
            r.listed_in.as_secs_f64()
        );
    }
    let per_pod = (full.rss_kib.saturating_sub(empty.rss_kib)) as f64 * 1024.0 / c.pods as f64;
    let _ = writeln!(
        out,
        "  kept per pod (RSS over the empty API, Services and namespaces included): {per_pod:.0} bytes; names checked on a real connection"
    );
    Ok(out)
}
