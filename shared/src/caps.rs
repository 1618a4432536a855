//! The capability matrix of DESIGN.md, in one place.
//!
//! Every permission check in Pulse (subscriptions, mutations, HTTP routes, console
//! requests, commands) goes through [`authorize`] over [`scope_of`]. Nothing else in the
//! code base decides who may do what; a route that needs a decision asks here.

use serde::{Deserialize, Serialize};

/// A role, as mapped from the Symfony role names of a JWT (or the deploy key, which is
/// `Service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the platform; sees every tenant.
    PlatformAdmin,
    /// Administers one tenant (organisation).
    TenantAdmin,
    /// Works for one tenant.
    Staff,
    /// A member of one tenant.
    Member,
    /// A service holding the deploy key (Symfony itself, scripts, the console over TCP).
    Service,
}

impl Role {
    /// Every role, in matrix column order.
    pub const ALL: [Role; 5] = [
        Role::PlatformAdmin,
        Role::TenantAdmin,
        Role::Staff,
        Role::Member,
        Role::Service,
    ];

    /// The role's wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Staff => "staff",
            Role::Member => "member",
            Role::Service => "service",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// Something a principal may be allowed to do: one row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Publish one's own presence (heartbeats).
    PublishPresence,
    /// See who is online in a tenant.
    SeePresence,
    /// Read one's own notifications and mark them read.
    ReadOwnNotifications,
    /// Send notifications to users.
    SendNotifications,
    /// See live dashboard metrics.
    SeeMetrics,
    /// Read a live table (the schema file further limits which roles may read which table).
    ReadLiveTable,
    /// Call a mutation declared in the schema file (which lists the roles that may call
    /// it). Not a row of DESIGN.md's table: every user role in its own tenant, services
    /// anywhere (the cells of "upload files"), narrowed by the schema's list.
    CallMutation,
    /// Upload files.
    UploadFiles,
    /// Read (download) a file.
    ReadFile,
    /// Delete a file.
    DeleteFile,
    /// View and change the platform settings.
    ManageSettings,
    /// The console: logs, data explorer, jobs.
    Console,
    /// Run a scheduled job now.
    RunJob,
    /// Erase a user's realtime data and files (GDPR).
    EraseUserData,
    /// Export a user's realtime data (GDPR).
    ExportUserData,
}

impl Capability {
    /// Every capability, in matrix row order.
    pub const ALL: [Capability; 15] = [
        Capability::PublishPresence,
        Capability::SeePresence,
        Capability::ReadOwnNotifications,
        Capability::SendNotifications,
        Capability::SeeMetrics,
        Capability::ReadLiveTable,
        Capability::CallMutation,
        Capability::UploadFiles,
        Capability::ReadFile,
        Capability::DeleteFile,
        Capability::ManageSettings,
        Capability::Console,
        Capability::RunJob,
        Capability::EraseUserData,
        Capability::ExportUserData,
    ];
}

/// How far a role's permission reaches for one capability: one cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Not allowed.
    Denied,
    /// Allowed for every tenant and every owner.
    Any,
    /// Allowed within the principal's own tenant.
    OwnTenant,
    /// Allowed on the principal's own things only (own presence, own inbox, own files,
    /// own data), within their tenant.
    Own,
    /// Within the own tenant, only rows the principal owns, where the target has an owner
    /// (live tables with an owner column).
    OwnTenantOwnedRows,
    /// Within the own tenant, public things and the principal's own (files for members).
    OwnTenantPublicOrOwn,
}

/// The matrix itself. One match, one line a cell, in the order of DESIGN.md.
pub const fn scope_of(role: Role, capability: Capability) -> Scope {
    use Capability as C;
    use Role as R;
    use Scope as S;
    match (capability, role) {
        (C::PublishPresence, R::Service) => S::Denied,
        (C::PublishPresence, _) => S::Own,

        (C::SeePresence, R::PlatformAdmin | R::Service) => S::Any,
        (C::SeePresence, R::TenantAdmin | R::Staff | R::Member) => S::OwnTenant,

        (C::ReadOwnNotifications, R::Service) => S::Denied,
        (C::ReadOwnNotifications, _) => S::Own,

        (C::SendNotifications, R::PlatformAdmin | R::Service) => S::Any,
        (C::SendNotifications, R::TenantAdmin | R::Staff) => S::OwnTenant,
        (C::SendNotifications, R::Member) => S::Denied,

        (C::SeeMetrics, R::PlatformAdmin | R::Service) => S::Any,
        (C::SeeMetrics, R::TenantAdmin | R::Staff) => S::OwnTenant,
        (C::SeeMetrics, R::Member) => S::Denied,

        (C::ReadLiveTable, R::Service) => S::Any,
        (C::ReadLiveTable, R::PlatformAdmin | R::TenantAdmin | R::Staff) => S::OwnTenant,
        (C::ReadLiveTable, R::Member) => S::OwnTenantOwnedRows,

        (C::CallMutation, R::Service) => S::Any,
        (C::CallMutation, _) => S::OwnTenant,

        (C::UploadFiles, R::Service) => S::Any,
        (C::UploadFiles, _) => S::OwnTenant,

        (C::ReadFile, R::PlatformAdmin | R::Service) => S::Any,
        (C::ReadFile, R::TenantAdmin | R::Staff) => S::OwnTenant,
        (C::ReadFile, R::Member) => S::OwnTenantPublicOrOwn,

        (C::DeleteFile, R::PlatformAdmin | R::Service) => S::Any,
        (C::DeleteFile, R::TenantAdmin) => S::OwnTenant,
        (C::DeleteFile, R::Staff | R::Member) => S::Own,

        (C::ManageSettings | C::Console | C::RunJob, R::PlatformAdmin | R::Service) => S::Any,
        (C::ManageSettings | C::Console | C::RunJob, _) => S::Denied,

        (C::EraseUserData, R::PlatformAdmin | R::Service) => S::Any,
        (C::EraseUserData, R::TenantAdmin) => S::OwnTenant,
        (C::EraseUserData, R::Staff | R::Member) => S::Denied,

        (C::ExportUserData, R::PlatformAdmin | R::Service) => S::Any,
        (C::ExportUserData, R::TenantAdmin) => S::OwnTenant,
        (C::ExportUserData, R::Staff) => S::Denied,
        (C::ExportUserData, R::Member) => S::Own,
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id (JWT `sub` or configured claim); `None` for the deploy key.
    pub user: Option<String>,
    /// The tenant the principal belongs to; `None` for platform-wide principals.
    pub tenant: Option<String>,
    /// Roles, already mapped from Symfony role names.
    pub roles: Vec<Role>,
}

/// What is being acted on. Fields left `None` are not part of the decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target<'a> {
    /// The tenant the thing belongs to.
    pub tenant: Option<&'a str>,
    /// The user who owns it (the notification's recipient, the file's uploader, the
    /// presence's user, the row's owner column, the user whose data is exported).
    pub owner: Option<&'a str>,
    /// Whether the thing is public within its tenant (files).
    pub public: bool,
    /// The roles the schema file lists for the live table or mutation at hand. They narrow
    /// the matrix: a role not listed has no part in the decision (services always have).
    /// `None` where the schema has no say.
    pub listed: Option<&'a [Role]>,
}

/// The verdict of [`authorize`]: the widest scope that allowed it, so that callers that
/// filter (live tables for members) know to filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed under this scope.
    Allowed(Scope),
    /// Not allowed; the reason is for the error message.
    Denied(DenyReason),
}

/// Why a check failed, for the `forbidden` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// None of the principal's roles has the capability.
    Role,
    /// The roles have it, but only for another tenant.
    Tenant,
    /// The roles have it, but only for the principal's own things.
    Owner,
    /// The roles that have it are not among those the schema file lists for this.
    NotListed,
}

impl DenyReason {
    /// A sentence for the error message.
    pub const fn explain(self) -> &'static str {
        match self {
            DenyReason::Role => "none of your roles may do this",
            DenyReason::Tenant => "this belongs to another tenant",
            DenyReason::Owner => "you may only do this for what is yours",
            DenyReason::NotListed => "the schema file lists none of your roles for this",
        }
    }

    /// How much the reason says: a tenant or owner mismatch says more than a role the
    /// schema does not list, which says more than no role at all.
    const fn weight(self) -> u8 {
        match self {
            DenyReason::Role => 0,
            DenyReason::NotListed => 1,
            DenyReason::Tenant | DenyReason::Owner => 2,
        }
    }
}

impl Decision {
    /// Whether the decision allows the action.
    pub const fn is_allowed(self) -> bool {
        matches!(self, Decision::Allowed(_))
    }
}

fn cell_allows(principal: &Principal, scope: Scope, target: &Target<'_>) -> Result<(), DenyReason> {
    let same_tenant = match (target.tenant, principal.tenant.as_deref()) {
        (None, _) => true,
        (Some(t), Some(p)) => t == p,
        (Some(_), None) => false,
    };
    let owns = match (target.owner, principal.user.as_deref()) {
        (None, _) => true,
        (Some(o), Some(u)) => o == u,
        (Some(_), None) => false,
    };
    match scope {
        Scope::Denied => Err(DenyReason::Role),
        Scope::Any => Ok(()),
        Scope::OwnTenant if same_tenant => Ok(()),
        Scope::OwnTenant => Err(DenyReason::Tenant),
        Scope::Own | Scope::OwnTenantOwnedRows if !same_tenant => Err(DenyReason::Tenant),
        Scope::Own if target.owner.is_none() => Err(DenyReason::Owner),
        Scope::Own | Scope::OwnTenantOwnedRows if owns => Ok(()),
        Scope::Own | Scope::OwnTenantOwnedRows => Err(DenyReason::Owner),
        Scope::OwnTenantPublicOrOwn if !same_tenant => Err(DenyReason::Tenant),
        Scope::OwnTenantPublicOrOwn if target.public || (target.owner.is_some() && owns) => Ok(()),
        Scope::OwnTenantPublicOrOwn => Err(DenyReason::Owner),
    }
}

/// The one permission check. A principal with several roles is allowed when any role
/// allows; the returned scope is the first allowing role's, in matrix column order, so the
/// widest wins. Where the schema file lists roles ([`Target::listed`]), only those roles
/// (and services) count, so the scope is the widest listed role's.
pub fn authorize(principal: &Principal, capability: Capability, target: &Target<'_>) -> Decision {
    let mut roles = principal.roles.clone();
    roles.sort();
    let mut reason = DenyReason::Role;
    for role in roles {
        let scope = scope_of(role, capability);
        let unlisted = target
            .listed
            .is_some_and(|listed| role != Role::Service && !listed.contains(&role));
        let verdict = if unlisted {
            Err(DenyReason::NotListed)
        } else {
            cell_allows(principal, scope, target)
        };
        match verdict {
            Ok(()) => return Decision::Allowed(scope),
            // Keep the reason that says most (the last of equal weight).
            Err(r) if r.weight() >= reason.weight() => reason = r,
            Err(_) => {}
        }
    }
    Decision::Denied(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role) -> Principal {
        Principal {
            user: (role != Role::Service).then(|| "u1".to_string()),
            tenant: (role != Role::Service && role != Role::PlatformAdmin).then(|| "t1".to_string()),
            roles: vec![role],
        }
    }

    /// The matrix of DESIGN.md, written out again as the test's own table, cell by cell.
    #[test]
    fn every_cell_matches_the_design() {
        use Capability as C;
        use Scope as S;
        let expected: [(Capability, [Scope; 5]); 15] = [
            (C::PublishPresence, [S::Own, S::Own, S::Own, S::Own, S::Denied]),
            (
                C::SeePresence,
                [S::Any, S::OwnTenant, S::OwnTenant, S::OwnTenant, S::Any],
            ),
            (
                C::ReadOwnNotifications,
                [S::Own, S::Own, S::Own, S::Own, S::Denied],
            ),
            (
                C::SendNotifications,
                [S::Any, S::OwnTenant, S::OwnTenant, S::Denied, S::Any],
            ),
            (
                C::SeeMetrics,
                [S::Any, S::OwnTenant, S::OwnTenant, S::Denied, S::Any],
            ),
            (
                C::ReadLiveTable,
                [
                    S::OwnTenant,
                    S::OwnTenant,
                    S::OwnTenant,
                    S::OwnTenantOwnedRows,
                    S::Any,
                ],
            ),
            (
                C::CallMutation,
                [S::OwnTenant, S::OwnTenant, S::OwnTenant, S::OwnTenant, S::Any],
            ),
            (
                C::UploadFiles,
                [S::OwnTenant, S::OwnTenant, S::OwnTenant, S::OwnTenant, S::Any],
            ),
            (
                C::ReadFile,
                [
                    S::Any,
                    S::OwnTenant,
                    S::OwnTenant,
                    S::OwnTenantPublicOrOwn,
                    S::Any,
                ],
            ),
            (C::DeleteFile, [S::Any, S::OwnTenant, S::Own, S::Own, S::Any]),
            (
                C::ManageSettings,
                [S::Any, S::Denied, S::Denied, S::Denied, S::Any],
            ),
            (C::Console, [S::Any, S::Denied, S::Denied, S::Denied, S::Any]),
            (C::RunJob, [S::Any, S::Denied, S::Denied, S::Denied, S::Any]),
            (
                C::EraseUserData,
                [S::Any, S::OwnTenant, S::Denied, S::Denied, S::Any],
            ),
            (
                C::ExportUserData,
                [S::Any, S::OwnTenant, S::Denied, S::Own, S::Any],
            ),
        ];
        for (cap, row) in expected {
            for (role, scope) in Role::ALL.into_iter().zip(row) {
                assert_eq!(scope_of(role, cap), scope, "{cap:?} for {role:?}");
            }
        }
    }

    #[test]
    fn cross_tenant_attempts_are_denied_for_every_tenant_scoped_cell() {
        let other = Target {
            tenant: Some("t2"),
            owner: Some("u1"),
            public: true,
            listed: None,
        };
        for cap in Capability::ALL {
            for role in [Role::TenantAdmin, Role::Staff, Role::Member] {
                let decision = authorize(&who(role), cap, &other);
                match scope_of(role, cap) {
                    Scope::Any => assert!(decision.is_allowed()),
                    Scope::Denied => assert_eq!(decision, Decision::Denied(DenyReason::Role)),
                    _ => assert_eq!(
                        decision,
                        Decision::Denied(DenyReason::Tenant),
                        "{cap:?} for {role:?} reached another tenant"
                    ),
                }
            }
        }
    }

    #[test]
    fn own_scope_needs_the_owner() {
        let mine = Target {
            tenant: Some("t1"),
            owner: Some("u1"),
            public: false,
            listed: None,
        };
        let theirs = Target {
            owner: Some("u2"),
            ..mine.clone()
        };
        let member = who(Role::Member);
        assert!(authorize(&member, Capability::DeleteFile, &mine).is_allowed());
        assert_eq!(
            authorize(&member, Capability::DeleteFile, &theirs),
            Decision::Denied(DenyReason::Owner)
        );
        // A target with no owner is not "own".
        let unowned = Target {
            owner: None,
            ..mine.clone()
        };
        assert!(!authorize(&member, Capability::ExportUserData, &unowned).is_allowed());
        // Members read public files of their tenant and their own private ones.
        let public_theirs = Target {
            public: true,
            ..theirs.clone()
        };
        assert!(authorize(&member, Capability::ReadFile, &public_theirs).is_allowed());
        assert!(authorize(&member, Capability::ReadFile, &mine).is_allowed());
        assert!(!authorize(&member, Capability::ReadFile, &theirs).is_allowed());
        // Live tables: rows without an owner column are readable, owned rows only if own.
        assert_eq!(
            authorize(&member, Capability::ReadLiveTable, &unowned),
            Decision::Allowed(Scope::OwnTenantOwnedRows)
        );
        assert!(!authorize(&member, Capability::ReadLiveTable, &theirs).is_allowed());
    }

    #[test]
    fn roles_the_schema_does_not_list_take_no_part() {
        let own = |listed: &'static [Role]| Target {
            tenant: Some("t1"),
            listed: Some(listed),
            ..Target::default()
        };
        let staff = who(Role::Staff);
        for cap in [Capability::ReadLiveTable, Capability::CallMutation] {
            assert!(authorize(&staff, cap, &own(&[Role::Staff])).is_allowed());
            assert_eq!(
                authorize(&staff, cap, &own(&[Role::Member])),
                Decision::Denied(DenyReason::NotListed),
                "{cap:?}"
            );
            assert_eq!(
                authorize(&staff, cap, &own(&[])),
                Decision::Denied(DenyReason::NotListed)
            );
            // Services are never narrowed by the schema.
            assert!(authorize(&who(Role::Service), cap, &own(&[])).is_allowed());
            // Listed, but another tenant's: the tenant is the reason.
            let other = Target {
                tenant: Some("t2"),
                ..own(&[Role::Staff])
            };
            assert_eq!(
                authorize(&staff, cap, &other),
                Decision::Denied(DenyReason::Tenant)
            );
        }
        // A staff member who is also a member, on a table only members read: the member's
        // scope (own rows), not the staff's (the whole tenant).
        let both = Principal {
            roles: vec![Role::Member, Role::Staff],
            ..who(Role::Member)
        };
        assert_eq!(
            authorize(&both, Capability::ReadLiveTable, &own(&[Role::Member])),
            Decision::Allowed(Scope::OwnTenantOwnedRows)
        );
        assert_eq!(
            authorize(
                &both,
                Capability::ReadLiveTable,
                &own(&[Role::Member, Role::Staff])
            ),
            Decision::Allowed(Scope::OwnTenant)
        );
        // Capabilities the schema has no say in are unchanged.
        assert!(
            authorize(
                &staff,
                Capability::SeeMetrics,
                &Target {
                    tenant: Some("t1"),
                    ..Target::default()
                }
            )
            .is_allowed()
        );
    }

    #[test]
    fn several_roles_take_the_widest() {
        let p = Principal {
            user: Some("u1".into()),
            tenant: Some("t1".into()),
            roles: vec![Role::Member, Role::TenantAdmin],
        };
        let theirs = Target {
            tenant: Some("t1"),
            owner: Some("u2"),
            public: false,
            listed: None,
        };
        assert_eq!(
            authorize(&p, Capability::DeleteFile, &theirs),
            Decision::Allowed(Scope::OwnTenant)
        );
    }

    #[test]
    fn no_roles_means_no_access() {
        let p = Principal {
            user: Some("u1".into()),
            tenant: Some("t1".into()),
            roles: vec![],
        };
        for cap in Capability::ALL {
            assert_eq!(
                authorize(&p, cap, &Target::default()),
                Decision::Denied(DenyReason::Role)
            );
        }
    }

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("ROLE_ADMIN"), None);
    }
}
