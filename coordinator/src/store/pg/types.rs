//! Ids as PostgreSQL `uuid`: the 128 bits of a ULID, big-endian, so uuid
//! order is id order (creation order). Written by hand instead of pulling
//! in a uuid crate for 16 bytes.

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};

use weft_proto::{NodeId, TaskId};

/// An id as a `uuid` parameter or column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Uuid(pub(super) u128);

impl From<TaskId> for Uuid {
    fn from(id: TaskId) -> Self {
        Uuid(id.as_u128())
    }
}

impl From<NodeId> for Uuid {
    fn from(id: NodeId) -> Self {
        Uuid(id.as_u128())
    }
}

impl Uuid {
    pub(super) fn task(self) -> TaskId {
        TaskId::from_u128(self.0)
    }
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Uuid {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }

    accepts!(UUID);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Uuid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let bytes: [u8; 16] = raw.try_into()?;
        Ok(Uuid(u128::from_be_bytes(bytes)))
    }

    accepts!(UUID);
}
