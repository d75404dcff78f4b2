//! Real Kubernetes components for the tests: no registry ships them, so they are built once from
//! Debian's `kubernetes` source package (1.20.2, full upstream tree with vendor/) with Debian's
//! Go 1.19, offline (`make WHAT=cmd/...`: plain `go build` lacks the generated openapi code;
//! kubernetes/build/README.md), and cached: kube-apiserver for the API tests, and the
//! controller-manager, scheduler, kubelet and kube-proxy for the one-node cluster
//! (`cargo xtask cluster`). About 9 minutes on 2 cores the first time.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use integration_test::kube::{CACHE, COMPONENTS, VERSION, component};

pub fn ensure() -> anyhow::Result<()> {
    crate::setup::ensure_packages(&[
        "golang-1.19-go",
        "golang-1.19-src",
        "rsync",
        "etcd-server",
        "dpkg-dev",
        "openssl",
    ])?;
    if COMPONENTS.iter().all(|c| component(c).exists()) {
        return Ok(());
    }
    println!(
        "==> building {} {VERSION} from Debian's kubernetes source package (about 9 min, once; cached in {CACHE})",
        COMPONENTS.join(", ")
    );
    let work = PathBuf::from(CACHE).join("k8s-src");
    std::fs::create_dir_all(work.join("apt/lists/partial"))?;
    let list = work.join("apt/src.list");
    // A private sources list with a deb-src line for the archive the machine already uses (its
    // own list has no deb-src lines).
    std::fs::write(
        &list,
        format!(
            "deb-src {} bookworm main\n",
            crate::setup::debian_archive("/debian")?
        ),
    )?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.current_dir(&work)
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", list.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(format!(
                "Dir::State::Lists={}",
                work.join("apt/lists").display()
            ))
            .args(args);
        c
    };
    crate::run(&mut apt(&["update", "-q"]))?;
    crate::run(&mut apt(&["source", "--download-only", "kubernetes"]))?;
    let dsc = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .context("no .dsc downloaded")?;
    let src = work.join("src");
    if !src.exists() {
        crate::run(
            Command::new("dpkg-source")
                .current_dir(&work)
                .arg("-x")
                .arg(&dsc)
                .arg(&src),
        )?;
    }
    let path = format!(
        "/usr/lib/go-1.19/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    crate::run(
        Command::new("make")
            .current_dir(&src)
            .env("PATH", path)
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=vendor")
            .env("CGO_ENABLED", "0")
            .env("KUBE_GIT_VERSION", VERSION)
            .env("KUBE_GIT_MAJOR", "1")
            .env("KUBE_GIT_MINOR", "20")
            .env("KUBE_GIT_TREE_STATE", "archive")
            .arg(format!(
                "WHAT={}",
                COMPONENTS
                    .iter()
                    .map(|c| format!("cmd/{c}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
    )?;
    for c in COMPONENTS {
        let built = src.join("_output/bin").join(c);
        if !built.exists() {
            bail!("make finished but {} is missing", built.display());
        }
        std::fs::copy(&built, component(c))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_this_machines_debian_archive() {
        let uri = crate::setup::debian_archive("/debian").expect("a Debian machine has one");
        assert!(
            uri.contains("://") && uri.trim_end_matches('/').ends_with("/debian"),
            "{uri}"
        );
    }
}
