//! SIP digest credentials for `examples/kamailio/kamailio.cfg`: the db_text
//! store its `auth_db` reads (HA1 hashes under the example's realm), and
//! the `Authorization` a phone signs a REGISTER with (RFC 2617, qop=auth).
//! Shared by tests/kamailio.rs and the SIP bench.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

/// The example's default digest realm.
pub const REALM: &str = "sip.example.com";

/// The example's credentials store, copied and filled per run.
const DBTEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kamailio/dbtext");

/// The password of a test account.
pub fn password(user: &str) -> String {
    format!("secret-of-{user}")
}

/// MD5 of `text`, in hex.
pub fn md5_hex(text: &str) -> String {
    Md5::digest(text.as_bytes())
        .iter()
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// A copy of the example's db_text store in `dir/dbtext` with `accounts`
/// in it, each with its [`password`]; the directory, for `DBURL`.
pub fn credentials(dir: &Path, accounts: &[&str]) -> PathBuf {
    let db = dir.join("dbtext");
    std::fs::create_dir_all(&db).expect("the db_text dir");
    std::fs::copy(Path::new(DBTEXT).join("version"), db.join("version"))
        .expect("the version table");
    let mut subscriber =
        std::fs::read_to_string(Path::new(DBTEXT).join("subscriber")).expect("the table");
    for (n, user) in accounts.iter().enumerate() {
        let ha1 = md5_hex(&format!("{user}:{REALM}:{}", password(user)));
        // id:username:domain:password:ha1:ha1b, no password kept.
        let _ = writeln!(subscriber, "{}:{user}:{REALM}::{ha1}:", n + 1);
    }
    std::fs::write(db.join("subscriber"), subscriber).expect("the subscriber table");
    db
}

/// A challenge a phone got (`WWW-Authenticate: Digest ...`).
#[derive(Debug, Clone)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
}

impl Challenge {
    /// Reads the realm and nonce of a `Digest` challenge header.
    pub fn parse(header: &str) -> Option<Challenge> {
        let params = header.trim().strip_prefix("Digest")?;
        let value = |name: &str| {
            params.split(',').find_map(|p| {
                let (key, value) = p.trim().split_once('=')?;
                (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
            })
        };
        Some(Challenge {
            realm: value("realm")?,
            nonce: value("nonce")?,
        })
    }

    /// The `Authorization` header value signing `method uri` for `user`
    /// with `password`; `nc` counts the uses of this nonce, `cnonce` is the
    /// client's own.
    pub fn authorization(
        &self,
        (user, password): (&str, &str),
        (method, uri): (&str, &str),
        nc: u32,
        cnonce: &str,
    ) -> String {
        let Challenge { realm, nonce } = self;
        let ha1 = md5_hex(&format!("{user}:{realm}:{password}"));
        let ha2 = md5_hex(&format!("{method}:{uri}"));
        let nc = format!("{nc:08x}");
        let response = md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
        format!(
            "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
             response=\"{response}\", algorithm=MD5, cnonce=\"{cnonce}\", qop=auth, nc={nc}"
        )
    }
}
