//! The node's state dir: its identity on disk, and reading a certificate.
//!
//! The layout (`--state-dir`, default `weft-node-state`; the Python worker
//! uses the same names):
//! - `node.key`: the node's private key, PKCS#8 PEM. Never sent anywhere.
//! - `node.pem`: its certificate chain, PEM, the node's certificate first.
//! - `ca.pem`: the cluster CA, PEM: what the node trusts the coordinator by.
//! - `node.conf`: `key=value` lines: `node_id`, `name`, `coordinator`.
//! - `node.join.key`: the key a join asks with, PKCS#8 PEM, while the join
//!   is under way (saved before it is sent, removed once its answer is
//!   saved).
//! - `node.join`: what that key was saved for, `key=value` lines: `token`
//!   (the join token's id) and `name`. Written after the key, removed with
//!   it.
//!
//! The dir is 0700 and every file 0600, written atomically (a temp file,
//! synced, then renamed, the dir synced). A dir without `node.conf` holds
//! no identity (a join that crashed half way is simply done again).
//!
//! A join saves its key as `node.join.key` before it asks, and a join
//! done again with the same token and name asks with the key it finds
//! there (the coordinator answers the same join again with the same node
//! id for a while, so an answer lost to a crash does not lock the node
//! out). A join with another token or name, or a key without a
//! `node.join` naming both, gets a new key: a key is never asked with
//! under a token or name other than its own. That key is always a new
//! one, never the key of an identity (an expired or revoked identity's
//! key may have been exposed, and is never certified again), and an
//! identity in the dir is left as it is until an answer arrives: a join
//! refused, or never answered, over an identity that only looked expired
//! (the clock ahead) leaves the node its identity. The answer is saved
//! whole: `node.key.new`, `node.pem.new` and `ca.pem.new` first, then
//! `node.conf` (the commit: the node id it names says which certificate
//! is the identity's), then the renames, then `node.join.key` removed.
//! `load` finishes a save cut short after its `node.conf`, and drops the
//! `.new` files of one cut short before (the old identity stays, and the
//! join key with it, to ask again with).
//! A key file group or others may read is refused, naming the fix.
//!
//! A missing dir is made 0700 (missing parents as usual). An existing one
//! is never changed: it must belong to this user and give group and others
//! nothing, else writing to it or loading from it is refused, naming the
//! fix (`--state-dir .` or `$HOME` is refused, not made private).
//!
//! A renewal replaces the key and the chain as a pair: both are written as
//! `node.key.new` and `node.pem.new` first, then renamed over `node.key`,
//! then `node.pem`. A crash part way leaves a pair `load` completes: it
//! takes the newest chain naming no other node than `node.conf` whose key
//! is at hand (`node.pem.new`, else `node.pem`; with `node.key.new`, else
//! `node.key`), finishes the renames and removes `.new` files left over.
//!
//! Files and parsing only: when to join or renew is decided elsewhere
//! (`lib.rs`, `join.rs`, `renewal.rs`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use weft_proto::NodeId;

/// The private key's file name.
pub const KEY_FILE: &str = "node.key";
/// The certificate chain's file name.
pub const CHAIN_FILE: &str = "node.pem";
/// The cluster CA's file name.
pub const CA_FILE: &str = "ca.pem";
/// The settings file's name.
pub const CONF_FILE: &str = "node.conf";
/// The file of the key a join under way asks with.
pub const JOIN_KEY_FILE: &str = "node.join.key";
/// The file saying what the join key was saved for: the token's id and
/// the name.
pub const JOIN_FILE: &str = "node.join";
/// Appended to `node.key`, `node.pem` and `ca.pem` for a renewed pair or
/// a join's answer not yet in place.
pub const PENDING_SUFFIX: &str = ".new";

/// Why the state dir could not be read or written. The message names the
/// file and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or the dir could not be read, written or created.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error(
        "{path}: {why}; restore the state dir, or move it away and join again with a new token \
         (weft token create --role node)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The private key may be read by group or others.
    #[error(
        "the node's private key {path} has mode {mode:o}: group or others may read it; make it \
         0600 (chmod 600 {path}), and if others could read it, revoke this node \
         (weft nodes revoke NAME) and join again"
    )]
    KeyReadable {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// An existing state dir is not this user's alone.
    #[error("{}", dir_not_private(.path, *.owner, *.mode, *.user))]
    DirNotPrivate {
        /// The dir.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's (effective) uid.
        user: u32,
    },
}

fn dir_not_private(path: &Path, owner: u32, mode: u32, user: u32) -> String {
    let dir = path.display();
    let mut why = Vec::new();
    if owner != user {
        why.push(format!(
            "it belongs to uid {owner}, not to this user (uid {user})"
        ));
    }
    if mode & 0o077 != 0 {
        why.push("group or others have access to it".to_owned());
    }
    let fix = if owner == user {
        format!("chmod 700 {dir}, or choose another --state-dir")
    } else {
        format!("choose another --state-dir, or give it to this user (chown) and chmod 700 {dir}")
    };
    format!(
        "the state dir {dir} (owner uid {owner}, mode {mode:o}) is not private to this node: {}; \
         {fix} (an existing dir is not changed)",
        why.join(" and ")
    )
}

/// A node's identity as kept in its state dir.
#[derive(Clone, PartialEq, Eq)]
pub struct Stored {
    /// The node id its certificate names.
    pub node_id: NodeId,
    /// The name it joined with.
    pub name: String,
    /// The coordinator addresses it joined through (comma-separated when
    /// several).
    pub coordinator: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate chain, PEM, leaf first.
    pub chain_pem: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

/// `node.conf`: what is not a certificate or a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeConf {
    pub(crate) node_id: NodeId,
    pub(crate) name: String,
    pub(crate) coordinator: String,
}

impl NodeConf {
    /// Reads `key=value` lines; blank lines and `#` comments are skipped,
    /// unknown keys ignored (a later version may add some).
    pub(crate) fn parse(text: &str) -> Result<NodeConf, String> {
        let (mut node_id, mut name, mut coordinator) = (None, None, None);
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {}: expected key=value", number + 1));
            };
            let value = value.trim().to_owned();
            match key.trim() {
                "node_id" => node_id = Some(value),
                "name" => name = Some(value),
                "coordinator" => coordinator = Some(value),
                _ => {}
            }
        }
        let required = |value: Option<String>, key: &str| {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("no {key}= line"))
        };
        let node_id = required(node_id, "node_id")?;
        let node_id = node_id
            .parse::<NodeId>()
            .map_err(|err| format!("node_id '{node_id}': {err}"))?;
        Ok(NodeConf {
            node_id,
            name: required(name, "name")?,
            coordinator: required(coordinator, "coordinator")?,
        })
    }

    /// The file's text.
    pub(crate) fn format(&self) -> String {
        format!(
            "node_id={}\nname={}\ncoordinator={}\n",
            self.node_id, self.name, self.coordinator
        )
    }
}

/// When the node's certificate is valid: what renewal and expiry go by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// The first certificate of a PEM chain: its validity, and whether
/// `public_key` (the raw subject public key, what rcgen's
/// `public_key_raw` answers) is the one it certifies.
pub(crate) fn leaf_validity(chain_pem: &str, public_key: &[u8]) -> Result<Validity, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
        .map_err(|err| format!("no PEM certificate: {err}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|err| format!("the certificate does not parse: {err}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err("the certificate is not for the node's key".into());
    }
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    };
    let validity = cert.validity();
    Ok(Validity {
        not_before: time(validity.not_before),
        not_after: time(validity.not_after),
    })
}

/// The raw public key of a PEM private key.
pub(crate) fn public_key_of(key_pem: &str) -> Result<Vec<u8>, String> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|err| err.to_string())?;
    Ok(key.public_key_raw().to_vec())
}

/// The state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// The state dir at `path` (nothing is read or made yet).
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir { path: path.into() }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name in `node.conf`, if it can be read: the name a node that
    /// joined registers with (`weft-node` uses it when `--name` is not
    /// given).
    pub fn stored_name(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.path.join(CONF_FILE)).ok()?;
        NodeConf::parse(&text).ok().map(|conf| conf.name)
    }

    /// Where the cluster CA is kept.
    pub fn ca_file(&self) -> PathBuf {
        self.path.join(CA_FILE)
    }

    /// The identity kept here, if any: `None` when there is no `node.conf`
    /// (no dir, an empty one, or a join that did not finish). Then the dir
    /// must be private, the key readable by nobody else and matching the
    /// certificate (a renewal or a join's save cut short is finished
    /// first, or its `.new` files dropped when `node.conf` names the old
    /// identity).
    pub fn load(&self) -> Result<Option<(Stored, Validity)>, StateError> {
        let conf_path = self.path.join(CONF_FILE);
        let conf = match std::fs::read_to_string(&conf_path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    what: "reading",
                    path: conf_path,
                    source,
                });
            }
        };
        self.check_private()?;
        let conf = NodeConf::parse(&conf).map_err(|why| StateError::Damaged {
            path: conf_path,
            why,
        })?;
        let (key_pem, chain_pem, validity) = self.settle_pair(conf.node_id)?;
        let ca_pem = self.settle_ca(&chain_pem)?;
        self.drop_used_join_key(&key_pem)?;
        let stored = Stored {
            node_id: conf.node_id,
            name: conf.name,
            coordinator: conf.coordinator,
            key_pem,
            chain_pem,
            ca_pem,
        };
        Ok(Some((stored, validity)))
    }

    /// Saves a whole identity (after a join), crash-safely over one there
    /// (see the module doc): the dir made 0700 if missing (an existing one
    /// must be private); the key, the chain and the CA written as `.new`
    /// files; `node.conf`, the commit; the renames; then `node.join.key`
    /// removed. Each step synced, so that a crash leaves either the old
    /// identity (and the join key) or the new one.
    pub fn save(&self, stored: &Stored) -> Result<(), StateError> {
        self.make_dir()?;
        self.stage(stored)?;
        self.write_conf(stored)?;
        let (key, chain, ca) = (
            self.path.join(KEY_FILE),
            self.path.join(CHAIN_FILE),
            self.ca_file(),
        );
        for path in [&key, &chain, &ca] {
            rename(&pending(path), path)?;
        }
        self.sync_dir();
        self.remove_join_key()
    }

    /// The first step of [`Self::save`]: `node.key.new`, `node.pem.new`
    /// and `ca.pem.new`, each whole, their names durable.
    fn stage(&self, stored: &Stored) -> Result<(), StateError> {
        write_private(&pending(&self.ca_file()), stored.ca_pem.as_bytes())?;
        self.write_pending(&stored.key_pem, &stored.chain_pem)
    }

    /// The commit of [`Self::save`]: `node.conf`, made durable.
    fn write_conf(&self, stored: &Stored) -> Result<(), StateError> {
        let conf = NodeConf {
            node_id: stored.node_id,
            name: stored.name.clone(),
            coordinator: stored.coordinator.clone(),
        };
        write_private(&self.path.join(CONF_FILE), conf.format().as_bytes())?;
        self.sync_dir_or_fail()
    }

    /// The key a join under way with the token `token_id` as `name` asks
    /// with ([`JOIN_KEY_FILE`], saved by [`Self::save_join_key`]),
    /// whether or not an identity is there: a join asked again (its answer
    /// lost, or refused for now) asks with the same key. `None`: there is
    /// none, it was saved for another token or name (or [`JOIN_FILE`]
    /// does not say), or it is the identity's own key now (a save cut
    /// short before it removed the file: removed now; the key of an
    /// identity is never asked with again). A key group or others may
    /// read is refused, as by `load`.
    pub fn saved_key(&self, token_id: &str, name: &str) -> Result<Option<String>, StateError> {
        let path = self.path.join(JOIN_KEY_FILE);
        let Some(pem) = read_if_there(&path)? else {
            return Ok(None);
        };

        self.check_private()?;
        check_key_mode(&path)?;
        public_key_of(&pem).map_err(|why| StateError::Damaged {
            path: path.clone(),
            why: format!("not a private key ({why})"),
        })?;
        if self.has_conf()?
            && let Some(key_pem) = read_if_there(&self.path.join(KEY_FILE))?
            && same_key(&key_pem, &pem)
        {
            self.remove_join_key()?;
            return Ok(None);
        }
        let saved_for = read_if_there(&self.path.join(JOIN_FILE))?;
        if saved_for.as_deref() != Some(join_record(token_id, name).as_str()) {
            return Ok(None);
        }
        Ok(Some(pem))
    }

    /// Saves the key a join with the token `token_id` as `name` is about
    /// to ask with as [`JOIN_KEY_FILE`], then what it is for as
    /// [`JOIN_FILE`] (durably), before the join is sent: see
    /// [`Self::saved_key`]. The key first: a crash between the two leaves
    /// a new key, never sent, under an older `node.join`, never a key
    /// that was sent under the new one. An identity there is not touched:
    /// it is replaced only by the answer ([`Self::save`]).
    pub fn save_join_key(
        &self,
        key_pem: &str,
        token_id: &str,
        name: &str,
    ) -> Result<(), StateError> {
        self.make_dir()?;
        write_private(&self.path.join(JOIN_KEY_FILE), key_pem.as_bytes())?;
        write_private(
            &self.path.join(JOIN_FILE),
            join_record(token_id, name).as_bytes(),
        )?;
        self.sync_dir();
        Ok(())
    }

    /// Removes [`JOIN_KEY_FILE`], then [`JOIN_FILE`] (durably), if there.
    fn remove_join_key(&self) -> Result<(), StateError> {
        let mut removed = false;
        for name in [JOIN_KEY_FILE, JOIN_FILE] {
            let path = self.path.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        what: "removing",
                        path,
                        source,
                    });
                }
            }
        }
        if removed {
            self.sync_dir();
        }
        Ok(())
    }

    /// Removes the join key if it is `key_pem`, the identity's: a save cut
    /// short after its `node.conf` left it.
    fn drop_used_join_key(&self, key_pem: &str) -> Result<(), StateError> {
        let path = self.path.join(JOIN_KEY_FILE);
        if read_if_there(&path)?.is_some_and(|pem| same_key(&pem, key_pem)) {
            self.remove_join_key()?;
        }
        Ok(())
    }

    /// The CA that goes with `chain_pem`, left in place as `ca.pem`:
    /// `ca.pem.new` when it issued the chain (a join's save cut short after
    /// its `node.conf`: renamed into place), else `ca.pem` (a `ca.pem.new`
    /// left by a save cut short before is removed).
    fn settle_ca(&self, chain_pem: &str) -> Result<String, StateError> {
        let path = self.ca_file();
        let new = pending(&path);
        if let Some(ca_pem) = read_if_there(&new)? {
            if issued_by(chain_pem, &ca_pem) {
                rename(&new, &path)?;
                self.sync_dir();
                return Ok(ca_pem);
            }
            std::fs::remove_file(&new).map_err(io_err("removing", &new))?;
            self.sync_dir();
        }
        read(&path)
    }

    /// Whether `node.conf` is there (an identity, maybe expired).
    fn has_conf(&self) -> Result<bool, StateError> {
        let conf = self.path.join(CONF_FILE);
        conf.try_exists().map_err(io_err("checking for", &conf))
    }

    /// Replaces the key and the chain (after a renewal) as a pair: both
    /// are written as `.new` files (synced), then renamed into place, the
    /// key first. A crash at any point leaves a pair `load` completes.
    pub fn save_certificate(&self, key_pem: &str, chain_pem: &str) -> Result<(), StateError> {
        self.make_dir()?;
        self.write_pending(key_pem, chain_pem)?;
        let (key, chain) = (self.path.join(KEY_FILE), self.path.join(CHAIN_FILE));
        rename(&pending(&key), &key)?;
        rename(&pending(&chain), &chain)?;
        self.sync_dir();
        Ok(())
    }

    /// Writes `node.key.new` and `node.pem.new`, each whole, and makes
    /// their names durable: the first half of [`Self::save_certificate`].
    fn write_pending(&self, key_pem: &str, chain_pem: &str) -> Result<(), StateError> {
        write_private(&pending(&self.path.join(KEY_FILE)), key_pem.as_bytes())?;
        write_private(&pending(&self.path.join(CHAIN_FILE)), chain_pem.as_bytes())?;
        self.sync_dir_or_fail()
    }

    /// The key and chain that belong together, with the chain's validity,
    /// left in place as `node.key` and `node.pem`: the newest chain
    /// (`node.pem.new`, else `node.pem`) naming no other node than
    /// `node_id` whose key is there (`node.key.new`, else `node.key`). A
    /// renewal or a join's save cut short is finished, and `.new` files
    /// left over are removed (those of a join's answer whose `node.conf`
    /// was not written name another node). No such pair: `Damaged`, as
    /// before a renewal.
    fn settle_pair(&self, node_id: NodeId) -> Result<(String, String, Validity), StateError> {
        let key_path = self.path.join(KEY_FILE);
        let chain_path = self.path.join(CHAIN_FILE);
        let (key_new, chain_new) = (pending(&key_path), pending(&chain_path));
        // A first join's save cut short after its `node.conf` has only the
        // `.new` files.
        let key_pem = read_if_there(&key_path)?;
        if key_pem.is_some() {
            check_key_mode(&key_path)?;
        }
        let chain_pem = read_if_there(&chain_path)?;
        let new_key_pem = read_if_there(&key_new)?;
        if new_key_pem.is_some() {
            check_key_mode(&key_new)?;
        }
        let new_chain_pem = read_if_there(&chain_new)?;
        let keys: Vec<(bool, &String, Vec<u8>)> =
            [(true, new_key_pem.as_ref()), (false, key_pem.as_ref())]
                .into_iter()
                .filter_map(|(new, pem)| {
                    let pem = pem?;
                    public_key_of(pem).ok().map(|public| (new, pem, public))
                })
                .collect();
        let chains = [(true, new_chain_pem.as_ref()), (false, chain_pem.as_ref())];
        let chosen = chains.into_iter().find_map(|(chain_is_new, chain)| {
            let chain = chain.filter(|chain| !names_another_node(chain, node_id))?;
            keys.iter().find_map(|(key_is_new, key, public)| {
                let validity = leaf_validity(chain, public).ok()?;
                Some((
                    *key_is_new,
                    (*key).clone(),
                    chain_is_new,
                    chain.clone(),
                    validity,
                ))
            })
        });
        let Some((key_is_new, key, chain_is_new, chain, validity)) = chosen else {
            // Nothing matches: say what is wrong with the pair in place.
            let key_pem = key_pem.map_or_else(|| read(&key_path), Ok)?;
            let chain_pem = chain_pem.map_or_else(|| read(&chain_path), Ok)?;
            let public_key = public_key_of(&key_pem).map_err(|why| StateError::Damaged {
                path: key_path.clone(),
                why: format!("not a private key ({why})"),
            })?;
            let why = match leaf_validity(&chain_pem, &public_key) {
                Err(why) => why,
                Ok(_) if names_another_node(&chain_pem, node_id) => {
                    format!("the certificate names another node than {CONF_FILE}'s {node_id}")
                }
                Ok(_) => "no certificate matches the key".to_owned(),
            };
            return Err(StateError::Damaged {
                path: chain_path,
                why: format!("{why} (in {})", key_path.display()),
            });
        };
        let mut changed = false;
        for (new, there, from, to) in [
            (key_is_new, new_key_pem.is_some(), &key_new, &key_path),
            (
                chain_is_new,
                new_chain_pem.is_some(),
                &chain_new,
                &chain_path,
            ),
        ] {
            if new {
                rename(from, to)?;
            } else if there {
                std::fs::remove_file(from).map_err(io_err("removing", from))?;
            }
            changed |= there;
        }
        if changed {
            self.sync_dir();
        }
        Ok((key, chain, validity))
    }

    /// Makes the dir (0700) if missing and checks that a file can be
    /// written in it.
    pub fn check_writable(&self) -> Result<(), StateError> {
        self.make_dir()?;
        let probe = write_temp(&self.path.join(".probe"), b"")?;
        std::fs::remove_file(&probe).map_err(io_err("removing", &probe))
    }

    /// Makes the dir 0700 if missing (parents as usual); an existing one
    /// is left as it is, and must be [private](Self::check_private).
    fn make_dir(&self) -> Result<(), StateError> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.path) {
            // Ours: 0700 whatever the umask took away.
            Ok(()) => std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("setting 0700 on", &self.path)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => self.check_private(),
            Err(source) => Err(StateError::Io {
                what: "creating",
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The dir must be this user's, with no permission for group or
    /// others: it holds the node's private key.
    fn check_private(&self) -> Result<(), StateError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.path).map_err(io_err("reading", &self.path))?;
        if !meta.is_dir() {
            return Err(StateError::Io {
                what: "using as the state dir",
                path: self.path.clone(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let (owner, mode) = (meta.uid(), meta.mode() & 0o777);
        let user = nix::unistd::geteuid().as_raw();
        if owner != user || mode & 0o077 != 0 {
            return Err(StateError::DirNotPrivate {
                path: self.path.clone(),
                owner,
                mode,
                user,
            });
        }
        Ok(())
    }

    /// Makes the renames durable; a failure only loses durability (used
    /// where nothing later relies on them being on disk).
    fn sync_dir(&self) {
        let _ = self.sync_dir_or_fail();
    }

    /// Makes the renames durable, or fails: used where a later step
    /// relies on them being on disk (a save's `.new` files before its
    /// `node.conf`, `node.conf` before the renames over the old identity).
    fn sync_dir_or_fail(&self) -> Result<(), StateError> {
        #[cfg(test)]
        if tests::FAIL_DIR_SYNC.with(std::cell::Cell::get) {
            return Err(StateError::Io {
                what: "syncing",
                path: self.path.clone(),
                source: std::io::Error::other("injected failure"),
            });
        }
        std::fs::File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err("syncing", &self.path))
    }
}

/// What [`JOIN_FILE`] holds for a join with the token `token_id` as
/// `name`.
fn join_record(token_id: &str, name: &str) -> String {
    format!("token={token_id}\nname={name}\n")
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(io_err("reading", path))
}

/// The file's text; `None` when there is no such file.
fn read_if_there(path: &Path) -> Result<Option<String>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}

/// A key file group or others may read is refused.
fn check_key_mode(path: &Path) -> Result<(), StateError> {
    let mode = std::fs::metadata(path)
        .map_err(io_err("reading", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(StateError::KeyReadable {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

/// Whether two PEM private keys are the same key.
fn same_key(a: &str, b: &str) -> bool {
    matches!((public_key_of(a), public_key_of(b)), (Ok(a), Ok(b)) if a == b)
}

/// Whether the first certificate of `chain_pem` names a node other than
/// `node_id` (its common name, as the coordinator issues it): the answer
/// to a join whose `node.conf` was not written.
fn names_another_node(chain_pem: &str, node_id: NodeId) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    cert.subject()
        .iter_common_name()
        .filter_map(|name| name.as_str().ok()?.parse::<NodeId>().ok())
        .any(|named| named != node_id)
}

/// Whether the first certificate of `chain_pem` is signed by the
/// certificate in `ca_pem`.
fn issued_by(chain_pem: &str, ca_pem: &str) -> bool {
    let parse = |text: &str| {
        x509_parser::pem::parse_x509_pem(text.as_bytes())
            .ok()
            .map(|(_, pem)| pem)
    };
    let (Some(leaf), Some(ca)) = (parse(chain_pem), parse(ca_pem)) else {
        return false;
    };
    let (Ok(leaf), Ok(ca)) = (leaf.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// `path` with [`PENDING_SUFFIX`]: where its renewed version waits.
fn pending(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(PENDING_SUFFIX);
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<(), StateError> {
    std::fs::rename(from, to).map_err(io_err("renaming to", to))
}

/// Writes `bytes` to a new 0600 temp file beside `path`, synced; answers
/// the temp file's path.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, StateError> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(bytes).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    Ok(tmp)
}

/// Writes `bytes` to `path` as 0600, through a temp file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = write_temp(path, bytes)?;
    rename(&tmp, path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The id of the join token the tests' joins are made with.
    const TOKEN: &str = "0123456789abcdef";

    thread_local! {
        /// Set by a test: every strict dir sync fails on this thread.
        pub(crate) static FAIL_DIR_SYNC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A CA, and a node certificate it signed for a fresh key, valid for
    /// `lifetime` from now: (key PEM, chain PEM, CA PEM).
    pub(crate) fn issued(lifetime: Duration) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let chain = leaf(&key, &issuer, lifetime);
        (key.serialize_pem(), chain + &ca_cert.pem(), ca_cert.pem())
    }

    /// A leaf for `key` signed by `issuer`, valid from now for `lifetime`.
    pub(crate) fn leaf(
        key: &rcgen::KeyPair,
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        lifetime: Duration,
    ) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after = now + lifetime;
        params.signed_by(key, issuer).unwrap().pem()
    }

    fn stored() -> Stored {
        let (key_pem, chain_pem, ca_pem) = issued(Duration::from_secs(3600));
        Stored {
            node_id: NodeId::new(),
            name: "n1".into(),
            coordinator: "10.0.0.5:7070".into(),
            key_pem,
            chain_pem,
            ca_pem,
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_saved_identity_loads_back_private_and_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("deep/state"));
        assert_eq!(state.load().unwrap(), None, "no dir: no identity");
        let identity = stored();
        state.save(&identity).unwrap();
        let (loaded, validity) = state.load().unwrap().expect("an identity");
        assert_eq!(loaded, identity);
        let lifetime = validity
            .not_after
            .duration_since(validity.not_before)
            .unwrap();
        assert!(lifetime.abs_diff(Duration::from_secs(3600)) <= Duration::from_secs(2));
        assert_eq!(mode(state.path()), 0o700);
        for file in [KEY_FILE, CHAIN_FILE, CA_FILE, CONF_FILE] {
            assert_eq!(mode(&state.path().join(file)), 0o600, "{file}");
        }
        let conf = std::fs::read_to_string(state.path().join(CONF_FILE)).unwrap();
        assert_eq!(
            conf,
            format!(
                "node_id={}\nname=n1\ncoordinator=10.0.0.5:7070\n",
                identity.node_id
            )
        );
        let names: Vec<_> = std::fs::read_dir(state.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert!(!format!("{identity:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_renewed_certificate_replaces_key_and_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let identity = stored();
        state.save(&identity).unwrap();
        let (key_pem, chain_pem, _) = issued(Duration::from_secs(60));
        state.save_certificate(&key_pem, &chain_pem).unwrap();
        let (loaded, validity) = state.load().unwrap().unwrap();
        assert_eq!((loaded.key_pem, loaded.chain_pem), (key_pem, chain_pem));
        assert_eq!(loaded.node_id, identity.node_id);
        assert!(
            validity
                .not_after
                .duration_since(validity.not_before)
                .unwrap()
                <= Duration::from_secs(61)
        );
    }

    #[test]
    fn a_key_others_may_read_is_refused_naming_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.save(&stored()).unwrap();
        let key = state.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = state.load().unwrap_err();
        assert!(matches!(err, StateError::KeyReadable { mode: 0o640, .. }));
        let message = err.to_string();
        assert!(
            message.contains("chmod 600") && message.contains("node.key"),
            "{message}"
        );
    }

    #[test]
    fn a_half_written_dir_holds_no_identity_and_a_mismatched_key_is_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let identity = stored();
        // A join that crashed before node.conf: joining again is right.
        state
            .save_certificate(&identity.key_pem, &identity.chain_pem)
            .unwrap();
        assert_eq!(state.load().unwrap(), None);
        state.save(&identity).unwrap();
        let (other_key, _, _) = issued(Duration::from_secs(60));
        state
            .save_certificate(&other_key, &identity.chain_pem)
            .unwrap();
        let err = state.load().unwrap_err().to_string();
        assert!(
            err.contains("not for the node's key") && err.contains("join again"),
            "{err}"
        );
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_existing_dir_others_may_use_is_left_alone_and_refused_naming_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::new(&dir);
        for err in [
            state.check_writable().unwrap_err(),
            state.save(&stored()).unwrap_err(),
        ] {
            assert!(
                matches!(err, StateError::DirNotPrivate { mode: 0o755, .. }),
                "{err:?}"
            );
            let message = err.to_string();
            for part in [
                format!("the state dir {}", dir.display()),
                "mode 755".to_owned(),
                format!("owner uid {}", nix::unistd::geteuid()),
                format!("chmod 700 {}, or choose another --state-dir", dir.display()),
            ] {
                assert!(message.contains(&part), "{part:?} in {message}");
            }
        }
        assert_eq!(mode(&dir), 0o755, "not changed");
        assert!(names_in(&dir).is_empty(), "nothing written");
        // Once private, it is used as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let identity = stored();
        state.save(&identity).unwrap();
        assert_eq!(state.load().unwrap().unwrap().0, identity);
    }

    #[test]
    fn an_identity_in_a_dir_others_may_use_is_refused_naming_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.save(&stored()).unwrap();
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let err = state.load().unwrap_err();
        assert!(
            matches!(err, StateError::DirNotPrivate { mode: 0o750, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("chmod 700 {}", state.path().display()))
                && message.contains("group or others"),
            "{message}"
        );
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(state.load().unwrap().is_some());
    }

    #[test]
    fn a_dir_of_another_user_is_refused_saying_to_choose_another() {
        let message = dir_not_private(Path::new("/srv/x"), 0, 0o700, 1000);
        assert!(
            message.contains("(owner uid 0, mode 700)")
                && message.contains("belongs to uid 0, not to this user (uid 1000)")
                && message.contains("choose another --state-dir"),
            "{message}"
        );
        let message = dir_not_private(Path::new("/srv/x"), 0, 0o755, 1000);
        assert!(message.contains(" and group or others"), "{message}");
    }

    /// What a crash left of a save: given the dir, the renewed key and chain.
    type Crash = Box<dyn Fn(&StateDir, &str, &str)>;

    /// A state dir holding an identity, and a renewed key and chain for
    /// it whose save was cut short by `crash`: (dir, the old identity, the
    /// renewed key, the renewed chain).
    fn renewal_cut_short(
        crash: impl FnOnce(&StateDir, &str, &str),
    ) -> (tempfile::TempDir, StateDir, Stored, String, String) {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let identity = stored();
        state.save(&identity).unwrap();
        let (key_pem, chain_pem, _) = issued(Duration::from_secs(7200));
        crash(&state, &key_pem, &chain_pem);
        (tmp, state, identity, key_pem, chain_pem)
    }

    fn key_and_chain_in(state: &StateDir) -> (String, String) {
        (
            std::fs::read_to_string(state.path().join(KEY_FILE)).unwrap(),
            std::fs::read_to_string(state.path().join(CHAIN_FILE)).unwrap(),
        )
    }

    #[test]
    fn a_renewal_cut_short_after_the_new_pair_is_written_or_half_renamed_loads_the_new_pair() {
        let in_place = |state: &StateDir, name: &str| {
            let path = state.path().join(name);
            std::fs::rename(pending(&path), &path).unwrap();
        };
        let crashes: [(&str, Crash); 3] = [
            (
                "after writing node.key.new and node.pem.new",
                Box::new(|state, key, chain| state.write_pending(key, chain).unwrap()),
            ),
            (
                "after renaming the key (new key, old chain)",
                Box::new(move |state, key, chain| {
                    state.write_pending(key, chain).unwrap();
                    in_place(state, KEY_FILE);
                }),
            ),
            (
                "after renaming the chain only (old key, new chain)",
                Box::new(move |state, key, chain| {
                    state.write_pending(key, chain).unwrap();
                    in_place(state, CHAIN_FILE);
                }),
            ),
        ];
        for (point, crash) in crashes {
            let (_tmp, state, identity, key_pem, chain_pem) = renewal_cut_short(crash);
            let (loaded, validity) = state.load().unwrap().expect(point);
            assert_eq!(
                (&loaded.key_pem, &loaded.chain_pem),
                (&key_pem, &chain_pem),
                "{point}: the renewed pair"
            );
            assert_eq!(loaded.node_id, identity.node_id, "{point}");
            let lifetime = validity.not_after.duration_since(validity.not_before);
            assert!(lifetime.unwrap() > Duration::from_secs(3600), "{point}");
            assert_eq!(
                key_and_chain_in(&state),
                (key_pem, chain_pem),
                "{point}: in place"
            );
            assert_eq!(
                names_in(state.path()),
                [CA_FILE, CONF_FILE, KEY_FILE, CHAIN_FILE],
                "{point}: no .new file left"
            );
            assert_eq!(mode(&state.path().join(KEY_FILE)), 0o600, "{point}");
            assert!(state.load().unwrap().is_some(), "{point}: loads again");
        }
    }

    #[test]
    fn a_renewal_cut_short_before_the_new_pair_is_whole_loads_the_old_pair() {
        let crashes: [(&str, Crash); 3] = [
            (
                "after writing node.key.new only",
                Box::new(|state, key, _| {
                    write_private(&pending(&state.path().join(KEY_FILE)), key.as_bytes()).unwrap()
                }),
            ),
            (
                "with a node.pem.new that does not parse",
                Box::new(|state, key, chain| state.write_pending(key, &chain[..100]).unwrap()),
            ),
            (
                "with a new pair that does not match",
                Box::new(|state, _, chain| {
                    let (other_key, _, _) = issued(Duration::from_secs(60));
                    state.write_pending(&other_key, chain).unwrap()
                }),
            ),
        ];
        for (point, crash) in crashes {
            let (_tmp, state, identity, _, _) = renewal_cut_short(crash);
            let (loaded, _) = state.load().unwrap().expect(point);
            assert_eq!(loaded, identity, "{point}: the old pair");
            assert_eq!(
                key_and_chain_in(&state),
                (identity.key_pem.clone(), identity.chain_pem.clone()),
                "{point}"
            );
            assert_eq!(
                names_in(state.path()),
                [CA_FILE, CONF_FILE, KEY_FILE, CHAIN_FILE],
                "{point}: the stale .new files removed"
            );
        }
    }

    /// [`StateDir::save`] of `stored` cut short after its `node.conf` and
    /// its first `renamed` renames (the key, then the chain, then the CA).
    pub(crate) fn save_cut_after(state: &StateDir, stored: &Stored, renamed: usize) {
        state.make_dir().unwrap();
        state.stage(stored).unwrap();
        state.write_conf(stored).unwrap();
        for name in [KEY_FILE, CHAIN_FILE, CA_FILE].into_iter().take(renamed) {
            let path = state.path().join(name);
            rename(&pending(&path), &path).unwrap();
        }
    }

    /// An identity as a coordinator issues it: its certificate names its
    /// node id, signed by a CA of its own.
    pub(crate) fn joined(name: &str) -> Stored {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let node_id = NodeId::new();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node_id.to_string());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after = now + Duration::from_secs(3600);
        let leaf = params.signed_by(&key, &issuer).unwrap().pem();
        Stored {
            node_id,
            name: name.into(),
            coordinator: "https://10.0.0.5:7070".into(),
            key_pem: key.serialize_pem(),
            chain_pem: leaf + &ca_pem,
            ca_pem,
        }
    }

    /// The files of the dir and what they hold.
    fn contents(state: &StateDir) -> Vec<(String, String)> {
        names_in(state.path())
            .into_iter()
            .map(|name| {
                let text = std::fs::read_to_string(state.path().join(&name)).unwrap();
                (name, text)
            })
            .collect()
    }

    #[test]
    fn a_join_key_is_kept_beside_an_identity_which_stays_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let identity = joined("n1");
        state.save(&identity).unwrap();
        // An identity's key is no join key.
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), None);
        let before = contents(&state);
        // A join over it (its certificate looked expired) saves a new key
        // beside it; the join is refused, or its answer lost: the
        // identity is as it was, and the key is asked with again.
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        state.save_join_key(&key, TOKEN, "n1").unwrap();
        let mut expected = before.clone();
        expected.push((JOIN_KEY_FILE.to_owned(), key.clone()));
        expected.push((JOIN_FILE.to_owned(), join_record(TOKEN, "n1")));
        expected.sort();
        assert_eq!(contents(&state), expected);
        assert_eq!(mode(&state.path().join(JOIN_KEY_FILE)), 0o600);
        assert_eq!(state.load().unwrap().unwrap().0, identity);
        assert_eq!(contents(&state), expected, "load leaves both");
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), Some(key.clone()));
        // Without node.conf too.
        std::fs::remove_file(state.path().join(CONF_FILE)).unwrap();
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), Some(key.clone()));
        // Others may read it: refused, naming the fix.
        let path = state.path().join(JOIN_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = state.saved_key(TOKEN, "n1").unwrap_err();
        assert!(matches!(err, StateError::KeyReadable { mode: 0o644, .. }));
    }

    #[test]
    fn a_join_key_is_asked_with_only_under_the_token_and_name_it_was_saved_for() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.save(&joined("n1")).unwrap();
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        state.save_join_key(&key, TOKEN, "n1").unwrap();
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), Some(key.clone()));
        assert_eq!(state.saved_key("fedcba9876543210", "n1").unwrap(), None);
        assert_eq!(state.saved_key(TOKEN, "n2").unwrap(), None);
        // A key without node.join (a crash before it was written) is
        // asked with under no token.
        std::fs::remove_file(state.path().join(JOIN_FILE)).unwrap();
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), None);
        // Saved again for another token: that token only.
        state.save_join_key(&key, "fedcba9876543210", "n1").unwrap();
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), None);
        assert_eq!(
            state.saved_key("fedcba9876543210", "n1").unwrap(),
            Some(key)
        );
    }

    #[test]
    fn a_save_whose_dir_sync_fails_fails_and_commits_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let old = joined("n1");
        state.save(&old).unwrap();
        let new = joined("n1");
        state.save_join_key(&new.key_pem, TOKEN, "n1").unwrap();
        FAIL_DIR_SYNC.with(|fail| fail.set(true));
        let err = state.save(&new).unwrap_err();
        FAIL_DIR_SYNC.with(|fail| fail.set(false));
        assert!(err.to_string().starts_with("syncing "), "{err}");
        assert_eq!(state.load().unwrap().unwrap().0, old, "not committed");
        assert_eq!(
            state.saved_key(TOKEN, "n1").unwrap(),
            Some(new.key_pem.clone()),
            "the join key kept, to ask again with"
        );
        state.save(&new).unwrap();
        assert_eq!(state.load().unwrap().unwrap().0, new);
    }

    #[test]
    fn a_join_answer_saved_over_an_identity_replaces_it_whole_and_its_join_key_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        let old = joined("n1");
        state.save(&old).unwrap();
        let new = joined("n1");
        state.save_join_key(&new.key_pem, TOKEN, "n1").unwrap();
        state.save(&new).unwrap();
        assert_eq!(state.load().unwrap().unwrap().0, new);
        assert_eq!(
            names_in(state.path()),
            [CA_FILE, CONF_FILE, KEY_FILE, CHAIN_FILE]
        );
        assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), None);
    }

    #[test]
    fn a_join_answer_whose_save_was_cut_short_leaves_the_old_identity_and_the_key_or_the_new_one() {
        // Cut short before node.conf: the old identity, whole; the answer's
        // .new files dropped; the join key kept, to ask again with.
        for first in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let state = StateDir::new(tmp.path().join("state"));
            let old = joined("n1");
            if !first {
                state.save(&old).unwrap();
            }
            let new = joined("n1");
            state.save_join_key(&new.key_pem, TOKEN, "n1").unwrap();
            state.stage(&new).unwrap();
            if first {
                assert_eq!(state.load().unwrap(), None, "no node.conf yet");
            } else {
                let before = contents(&state);
                assert_eq!(state.load().unwrap().unwrap().0, old);
                let left: Vec<_> = before
                    .into_iter()
                    .filter(|(name, _)| !name.ends_with(PENDING_SUFFIX))
                    .collect();
                assert_eq!(contents(&state), left, "the old files, as they were");
            }
            assert_eq!(
                state.saved_key(TOKEN, "n1").unwrap(),
                Some(new.key_pem.clone())
            );

            // Cut short after node.conf (the renames not done): the new
            // identity, its renames finished and its join key removed.
            state.stage(&new).unwrap();
            state.write_conf(&new).unwrap();
            assert_eq!(state.load().unwrap().unwrap().0, new, "first: {first}");
            assert_eq!(
                names_in(state.path()),
                [CA_FILE, CONF_FILE, KEY_FILE, CHAIN_FILE],
                "first: {first}"
            );
            assert_eq!(state.saved_key(TOKEN, "n1").unwrap(), None);
        }
    }

    #[test]
    fn a_join_key_left_by_a_save_cut_short_after_the_renames_is_never_asked_with() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("state"));
        state.save(&joined("n1")).unwrap();
        let new = joined("n1");
        state.save(&new).unwrap();
        // The crash: node.join.key not removed yet.
        state.save_join_key(&new.key_pem, TOKEN, "n1").unwrap();
        assert_eq!(
            state.saved_key(TOKEN, "n1").unwrap(),
            None,
            "the identity's key"
        );
        assert!(!state.path().join(JOIN_KEY_FILE).exists());
        state.save_join_key(&new.key_pem, TOKEN, "n1").unwrap();
        assert_eq!(state.load().unwrap().unwrap().0, new);
        assert!(!state.path().join(JOIN_KEY_FILE).exists(), "load drops it");
    }

    #[test]
    fn node_conf_reads_key_value_lines_and_names_what_is_missing() {
        let id = NodeId::new();
        let text = format!(
            "# a comment\n\nnode_id = {id}\nname=n-1.a_b\ncoordinator=https://c:1\nlater=x\n"
        );
        assert_eq!(
            NodeConf::parse(&text).unwrap(),
            NodeConf {
                node_id: id,
                name: "n-1.a_b".into(),
                coordinator: "https://c:1".into(),
            }
        );
        let conf = NodeConf::parse(&text).unwrap();
        assert_eq!(NodeConf::parse(&conf.format()).unwrap(), conf);
        let err = NodeConf::parse(&format!("node_id={id}\nname=n\n")).unwrap_err();
        assert_eq!(err, "no coordinator= line");
        let err = NodeConf::parse("node_id=nope\nname=n\ncoordinator=c\n").unwrap_err();
        assert!(err.starts_with("node_id 'nope'"), "{err}");
        let err = NodeConf::parse("garbage\n").unwrap_err();
        assert_eq!(err, "line 1: expected key=value");
    }
}
