//! Symfony's users, as the schema file's `[users]` entry declares them (table, id, tenant
//! and roles columns): who receives a notification sent to a whole tenant or to a role.
//!
//! The table is read from Symfony's database when a command needs it, never streamed and
//! never written. Roles are Symfony role names (a JSON array, as Symfony's `roles`
//! column stores them, a text array, or one name per user), mapped to Pulse roles by the
//! schema's `[roles]`; `ROLE_USER` counts for every user, as Symfony's `getRoles()` adds
//! it.

use pulse_shared::Role;
use tokio_postgres::GenericClient;

use crate::schema::{RolesColumn, Schema, UsersSource, quote_ident};

/// The role Symfony gives every user.
const IMPLIED_ROLE: &str = "ROLE_USER";

/// The ids of the tenant's users, of those with `role` when given, in id order.
pub async fn recipients<C: GenericClient>(
    db: &C,
    schema: &Schema,
    users: &UsersSource,
    tenant: &str,
    role: Option<Role>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let roles = match &users.roles {
        RolesColumn::List(c) => {
            let col = quote_ident(c);
            // json/jsonb arrays and text arrays alike; anything else holds no role.
            format!(
                "CASE WHEN jsonb_typeof(to_jsonb({col})) = 'array' \
                 THEN ARRAY(SELECT jsonb_array_elements_text(to_jsonb({col}))) END"
            )
        }
        RolesColumn::Single(c) => format!("ARRAY[{}::text]", quote_ident(c)),
    };
    let sql = format!(
        "SELECT {id}::text, array_remove(COALESCE({roles}, '{{}}'::text[]), NULL) FROM {table} \
         WHERE {tenant}::text = $1 AND {id} IS NOT NULL ORDER BY 1",
        id = quote_ident(&users.id_column),
        table = users.source.quoted(),
        tenant = quote_ident(&users.tenant_column),
    );
    let rows = db.query(&sql, &[&tenant]).await?;
    Ok(rows
        .iter()
        .filter(|r| {
            let Some(want) = role else { return true };
            let names: Vec<String> = r.get(1);
            schema
                .map_roles(names.iter().map(String::as_str).chain([IMPLIED_ROLE]))
                .contains(&want)
        })
        .map(|r| r.get(0))
        .collect())
}
