//! A real kube-apiserver (and its etcd) on 127.0.0.1 for a test: generated certificates, a token
//! file, AlwaysAllow authorization, and a kubeconfig. Stopped on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub const CACHE: &str = "/var/cache/observer";
pub const VERSION: &str = "v1.20.2";

/// What `cargo xtask test` builds from Debian's source and caches.
pub const COMPONENTS: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// Where `cargo xtask test` caches a built component.
pub fn component(name: &str) -> PathBuf {
    PathBuf::from(CACHE).join(format!("{name}-{VERSION}"))
}

/// The cached kube-apiserver.
pub fn binary() -> PathBuf {
    component("kube-apiserver")
}

pub struct KubeApi {
    pub kubeconfig: PathBuf,
    /// The API server's port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed its serving certificate.
    pub ca: PathBuf,
    procs: Vec<Child>,
}

/// A kubeconfig for the admin token of [`KubeApi`] at `server`.
pub fn kubeconfig(server: &str, ca: Option<&str>) -> String {
    let ca = ca.map_or(String::new(), |c| format!(", certificate-authority: {c}"));
    [
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        "- name: test",
        &format!("  cluster: {{server: \"{server}\"{ca}}}"),
        "users:",
        "- name: test",
        "  user: {token: testtoken}",
        "contexts:",
        "- name: test",
        "  context: {cluster: test, user: test}",
        "current-context: test",
    ]
    .join("\n")
        + "\n"
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl KubeApi {
    /// Start etcd and kube-apiserver with state in `dir`, on ports derived from `slot`.
    pub fn start(dir: &Path, slot: u16) -> anyhow::Result<KubeApi> {
        let bin = binary();
        if !bin.exists() {
            bail!("{} is missing: `cargo xtask test` builds it", bin.display());
        }
        std::fs::create_dir_all(dir)?;
        certificates(dir, "IP:127.0.0.1")?;
        let (etcd_port, peer_port, api_port) = (23790 + slot * 3, 23791 + slot * 3, 16443 + slot);
        let log = |name: &str| -> anyhow::Result<std::fs::File> {
            Ok(std::fs::File::create(dir.join(name))?)
        };
        let mut api = KubeApi {
            kubeconfig: dir.join("kubeconfig"),
            port: api_port,
            ca: dir.join("ca.crt"),
            procs: Vec::new(),
        };
        api.procs.push(
            Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.join("etcd"))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!(
                    "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
                ))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .stdout(Stdio::null())
                .stderr(log("etcd.log")?)
                .spawn()
                .context("starting etcd (Debian package etcd-server)")?,
        );
        let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
        api.procs.push(
            Command::new(&bin)
                .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
                .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                .arg(format!("--secure-port={api_port}"))
                .arg(format!("--tls-cert-file={}", p("tls.crt")))
                .arg(format!("--tls-private-key-file={}", p("tls.key")))
                .arg(format!("--token-auth-file={}", p("tokens.csv")))
                // RBAC, as a cluster has it: the admin token is in system:masters; /flows readers
                // are checked with SubjectAccessReview.
                .arg("--authorization-mode=RBAC")
                .arg(format!("--service-account-key-file={}", p("sa.key")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    p("sa.key")
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg("--service-cluster-ip-range=100.64.0.0/16")
                // No controller-manager here to mint service-account tokens.
                .arg("--disable-admission-plugins=ServiceAccount")
                .stdout(Stdio::null())
                .stderr(log("apiserver.log")?)
                .spawn()
                .context("starting kube-apiserver")?,
        );
        let server = format!("https://127.0.0.1:{api_port}");
        std::fs::write(&api.kubeconfig, kubeconfig(&server, Some(&p("ca.crt"))))?;
        wait_ready(dir, api_port)?;
        Ok(api)
    }

    /// `kubectl` against this apiserver; must succeed.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let env = format!("KUBECONFIG={}", self.kubeconfig.display());
        let cmd: Vec<&str> = ["env", env.as_str(), "kubectl"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Ok(observer_lab::netns::run_with_input(&cmd, stdin)?)
    }
}

/// Poll the apiserver's /readyz until it says ok (60 s at most).
fn wait_ready(dir: &Path, api_port: u16) -> anyhow::Result<()> {
    let ca = dir.join("ca.crt").to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &ca,
                "-H",
                "Authorization: Bearer testtoken",
            ])
            .arg(format!("https://127.0.0.1:{api_port}/readyz"))
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "ok" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kube-apiserver not ready after 60 s: {}",
                std::fs::read_to_string(dir.join("apiserver.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A CA, the apiserver's serving certificate for `san` (`IP:127.0.0.1,DNS:...`), a
/// service-account key and the admin's token (`testtoken`, group system:masters).
pub fn certificates(dir: &Path, san: &str) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=observer-test-ca",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    )?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    std::fs::write(
        dir.join("tokens.csv"),
        "testtoken,admin,admin,system:masters\n",
    )?;
    Ok(())
}

impl KubeApi {
    /// Freeze (true) or thaw (false) kube-apiserver: an API that accepts connections and never
    /// answers, the way a overloaded or partitioned one looks to a client.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        let pid = self.procs[1].id() as i32;
        // SAFETY: a signal to a child process this struct owns.
        assert_eq!(
            unsafe { libc::kill(pid, sig) },
            0,
            "signalling kube-apiserver"
        );
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.freeze(false);
        for p in self.procs.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
