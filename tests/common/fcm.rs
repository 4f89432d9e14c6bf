//! Stand-ins for FCM HTTP v1 and Google's OAuth2 token endpoint, and a
//! service-account file that points the real FCM pusher at them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use serde_json::json;

use super::stand_in::{Answer, Received};

pub const PROJECT: &str = "test-project";
pub const CLIENT_EMAIL: &str = "pusher@test-project.iam.gserviceaccount.com";

/// Google's token endpoint: a fresh token per request, valid for an hour.
pub fn token_endpoint() -> impl Fn(&Received) -> Answer + Send + Sync + 'static {
    let issued = AtomicUsize::new(0);
    move |_| {
        let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
        Answer::json(
            200,
            json!({"access_token": format!("ya29.test-token-{n}"), "expires_in": 3600, "token_type": "Bearer"}),
        )
    }
}

/// FCM accepting a message.
pub fn fcm_accepts() -> Answer {
    Answer::json(
        200,
        json!({"name": format!("projects/{PROJECT}/messages/1")}),
    )
}

/// An RSA key made for this test run (PKCS#8 PEM), made once per process.
pub fn rsa_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("the openssl binary");
        assert!(
            out.status.success(),
            "openssl genpkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("PEM is text")
    })
}

/// Writes a service-account file whose tokens come from `token_uri`.
pub fn service_account(dir: &Path, name: &str, project: &str, token_uri: &str) -> PathBuf {
    let path = dir.join(name);
    let key = json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123456789abcdef",
        "private_key": rsa_key(),
        "client_email": CLIENT_EMAIL,
        "client_id": "123456789",
        "auth_uri": "http://127.0.0.1:9/auth",
        "token_uri": token_uri,
    });
    std::fs::write(&path, key.to_string()).expect("write the service account");
    path
}
