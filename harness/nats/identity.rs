//! One NATS identity per device: the server's `authorization` block, with the harness's own
//! user (allowed everything) and one user per device, allowed only what its agent's
//! description implies ([`Permissions`]). Written as typed structs into the server's
//! configuration (JSON is valid nats-server configuration).

use super::NatsCredentials;
use crate::agent::description::Permissions;
use std::collections::BTreeMap;

/// The user whose name changes with each reload of the configuration: once it can log in, the
/// server runs the new configuration (a device's permissions included).
pub(crate) const RELOAD_USER_PREFIX: &str = "devicelab-reload-";

/// The devices' users, by name (the device id), and the reload marker.
#[derive(Debug, Default)]
pub(crate) struct Identities {
    pub devices: BTreeMap<String, DeviceUser>,
    /// Counts the configurations written: the reload marker's user is named after it.
    pub generation: u64,
    /// The reload marker's password (random per run).
    pub reload_password: String,
}

/// One device's user: its password, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceUser {
    pub password: String,
    pub permissions: Permissions,
}

#[derive(serde::Serialize)]
struct Authorization<'a> {
    users: Vec<User<'a>>,
}

#[derive(serde::Serialize)]
struct User<'a> {
    user: &'a str,
    password: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<ServerPermissions<'a>>,
}

#[derive(serde::Serialize)]
struct ServerPermissions<'a> {
    publish: Allow<'a>,
    subscribe: Allow<'a>,
    allow_responses: bool,
}

#[derive(serde::Serialize)]
struct Allow<'a> {
    allow: &'a [String],
}

/// A subject nothing uses: the reload marker's user may only log in.
const NOWHERE: &str = "_DEVICELAB.nothing";

impl Identities {
    /// The reload marker's user name in the configuration last written.
    pub fn reload_user(&self) -> String {
        format!("{RELOAD_USER_PREFIX}{}", self.generation)
    }

    /// The server's `authorization` block: the run's user, the reload marker, every device.
    pub fn authorization(&self, run: &NatsCredentials) -> String {
        let nowhere = [NOWHERE.to_owned()];
        let reload_user = self.reload_user();
        let mut users = vec![
            User {
                user: &run.user,
                password: &run.password,
                permissions: None,
            },
            User {
                user: &reload_user,
                password: &self.reload_password,
                permissions: Some(ServerPermissions {
                    publish: Allow { allow: &nowhere },
                    subscribe: Allow { allow: &nowhere },
                    allow_responses: false,
                }),
            },
        ];
        users.extend(self.devices.iter().map(|(name, device)| {
            let p = &device.permissions;
            User {
                user: name,
                password: &device.password,
                permissions: Some(ServerPermissions {
                    publish: Allow {
                        allow: if p.publish.is_empty() {
                            &nowhere
                        } else {
                            &p.publish
                        },
                    },
                    subscribe: Allow {
                        allow: if p.subscribe.is_empty() {
                            &nowhere
                        } else {
                            &p.subscribe
                        },
                    },
                    allow_responses: p.allow_responses,
                }),
            }
        }));
        serde_json::to_string_pretty(&Authorization { users })
            .expect("the authorization block serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_gets_its_own_user_and_only_its_permissions() {
        let mut ids = Identities {
            reload_password: "r".into(),
            ..Default::default()
        };
        ids.devices.insert(
            "dev-a".into(),
            DeviceUser {
                password: "pa".into(),
                permissions: Permissions {
                    publish: vec!["devicelab.status.dev-a".into()],
                    subscribe: vec!["_INBOX.dev-a.>".into()],
                    allow_responses: true,
                },
            },
        );
        let run = NatsCredentials {
            user: "devicelab".into(),
            password: "p".into(),
        };
        let text = ids.authorization(&run);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let users = parsed["users"].as_array().unwrap();
        assert_eq!(users.len(), 3, "{text}");
        assert_eq!(users[0]["user"], "devicelab");
        assert!(users[0].get("permissions").is_none(), "{text}");
        assert_eq!(users[1]["user"], "devicelab-reload-0");
        assert_eq!(users[2]["user"], "dev-a");
        assert_eq!(
            users[2]["permissions"]["publish"]["allow"][0],
            "devicelab.status.dev-a"
        );
        assert_eq!(users[2]["permissions"]["allow_responses"], true);
    }
}
