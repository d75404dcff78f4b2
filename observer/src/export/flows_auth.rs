//! Who may read /flows: the holder of a shared bearer token (`--flows-token-file`), or a
//! Kubernetes user whose token the API server vouches for and whom RBAC lets `get` the
//! non-resource URL /flows (`--flows-auth kubernetes`): a TokenReview, then a
//! SubjectAccessReview, as kube-rbac-proxy authorizes a request
//! (<https://github.com/brancz/kube-rbac-proxy>, `pkg/authn` and `pkg/authz`).
//!
//! The API calls run on the Kubernetes thread (`agent::names`): it stays in the host's network
//! namespace when `--netns` moves the agent, so it reaches the API where the watch does.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use log::{info, warn};
use tokio::sync::{mpsc, oneshot};

/// The path a reader must be allowed to `get` (an RBAC `nonResourceURLs` rule).
pub const FLOWS_PATH: &str = "/flows";
/// How long an answer of the API server is reused for the same token; kube-rbac-proxy caches
/// for minutes, a revoked reader here loses access within this.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Tokens remembered at most; beyond it the cache starts again empty.
const CACHE_MAX: usize = 1024;
/// Reviews waiting for the API server; beyond it a request gets 503 instead of a queue.
const REVIEW_QUEUE: usize = 64;
/// How long a request waits for the API server's answer.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one that is wrong, expired or for another audience: 401.
    Unauthenticated,
    /// A valid token whose user may not `get /flows`: 403.
    Forbidden,
    /// The API server could not be asked or did not answer: 503, and not remembered.
    Unavailable(String),
}

impl Verdict {
    /// The `outcome` label of `observer_flows_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Verdict::Allowed => "served",
            Verdict::Unauthenticated => "unauthorized",
            Verdict::Forbidden => "forbidden",
            Verdict::Unavailable(_) => "unavailable",
        }
    }
}

pub enum FlowsAuth {
    /// The shared token in this file, read on each request so a rotated Secret takes effect.
    TokenFile(PathBuf),
    Kubernetes(Reviewer),
}

impl FlowsAuth {
    pub async fn check(&self, bearer: Option<&str>) -> Verdict {
        let Some(got) = bearer.filter(|t| !t.is_empty()) else {
            return Verdict::Unauthenticated;
        };
        match self {
            // A few bytes from a local file (a mounted Secret): not worth a blocking-pool trip.
            FlowsAuth::TokenFile(path) => match std::fs::read_to_string(path) {
                Ok(want) if same_token(want.trim(), got) => Verdict::Allowed,
                Ok(_) => Verdict::Unauthenticated,
                Err(e) => {
                    warn!("reading the /flows token {}: {e}", path.display());
                    Verdict::Unauthenticated
                }
            },
            FlowsAuth::Kubernetes(r) => r.review(got).await,
        }
    }

    /// Who may read, for the log.
    pub fn describe(&self) -> String {
        match self {
            FlowsAuth::TokenFile(p) => format!("for clients with the token in {}", p.display()),
            FlowsAuth::Kubernetes(r) => format!(
                "for Kubernetes users allowed to get {FLOWS_PATH} (tokens for audience {:?})",
                r.audience
            ),
        }
    }
}

/// Equal tokens, compared in time that does not depend on where they first differ.
fn same_token(want: &str, got: &str) -> bool {
    !want.is_empty()
        && want.len() == got.len()
        && want
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

type Review = (String, oneshot::Sender<Verdict>);

/// The /flows side of Kubernetes reviews: a bounded queue to the Kubernetes thread and a cache
/// of its answers.
pub struct Reviewer {
    queue: mpsc::Sender<Review>,
    audience: String,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
}

/// The Kubernetes thread's side: run with [`serve_reviews`].
pub struct ReviewQueue {
    rx: mpsc::Receiver<Review>,
    audience: String,
}

pub fn reviewer(audience: &str) -> (Reviewer, ReviewQueue) {
    let (tx, rx) = mpsc::channel(REVIEW_QUEUE);
    (
        Reviewer {
            queue: tx,
            audience: audience.to_owned(),
            cache: Mutex::default(),
        },
        ReviewQueue {
            rx,
            audience: audience.to_owned(),
        },
    )
}

impl Reviewer {
    async fn review(&self, token: &str) -> Verdict {
        if let Some((at, v)) = self.cache.lock().expect("cache").get(token)
            && at.elapsed() < CACHE_TTL
        {
            return v.clone();
        }
        let (tx, rx) = oneshot::channel();
        if self.queue.try_send((token.to_owned(), tx)).is_err() {
            return Verdict::Unavailable(format!("{REVIEW_QUEUE} reviews are waiting already"));
        }
        let v = match tokio::time::timeout(REVIEW_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => Verdict::Unavailable("the Kubernetes thread stopped".into()),
            Err(_) => Verdict::Unavailable(format!(
                "the API server did not answer within {REVIEW_TIMEOUT:?}"
            )),
        };
        if !matches!(v, Verdict::Unavailable(_)) {
            let mut cache = self.cache.lock().expect("cache");
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(token.to_owned(), (Instant::now(), v.clone()));
        }
        v
    }
}

/// Answer reviews from the queue, each in a task of its own, until the agent drops its side.
pub async fn serve_reviews(client: Client, mut queue: ReviewQueue) {
    while let Some((token, reply)) = queue.rx.recv().await {
        let (client, audience) = (client.clone(), queue.audience.clone());
        tokio::spawn(async move {
            let _ = reply.send(review(client, &token, &audience).await);
        });
    }
}

async fn review(client: Client, token: &str, audience: &str) -> Verdict {
    let asked = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let answer = match Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &asked)
        .await
    {
        Ok(a) => a,
        Err(e) => return Verdict::Unavailable(format!("TokenReview: {e}")),
    };
    let Some(status) = answer.status.filter(|s| s.authenticated == Some(true)) else {
        return Verdict::Unauthenticated;
    };
    // An authenticator that ignores audiences answers with none: then the token was checked
    // against the API server's own audience, not ours (TokenReviewStatus, authentication/v1).
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Verdict::Unauthenticated;
    }
    let Some(user) = status.user else {
        return Verdict::Unauthenticated;
    };
    let asked = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(FLOWS_PATH.to_owned()),
                verb: Some("get".to_owned()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let who = user.username.unwrap_or_default();
    match Api::<SubjectAccessReview>::all(client)
        .create(&PostParams::default(), &asked)
        .await
    {
        Ok(a) if a.status.as_ref().is_some_and(|s| s.allowed) => {
            info!("/flows: {who} may read");
            Verdict::Allowed
        }
        Ok(_) => {
            info!("/flows: {who} may not get {FLOWS_PATH} (RBAC)");
            Verdict::Forbidden
        }
        Err(e) => Verdict::Unavailable(format!("SubjectAccessReview: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_must_match_exactly_and_an_empty_one_never_does() {
        assert!(same_token("s3cret-token", "s3cret-token"));
        assert!(!same_token("s3cret-token", "s3cret-tokeN"));
        assert!(!same_token("s3cret-token", "s3cret"));
        assert!(!same_token("", ""));
    }
}
