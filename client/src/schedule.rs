//! [`Client`]'s `ScheduleService` calls: cron schedules that submit a task
//! at set times (see the README's "Cron schedules").

use weft_proto::pb;

use crate::{Client, Error, request, unary};

fn schedule_from(
    schedule: Option<pb::Schedule>,
    field: &'static str,
) -> Result<pb::Schedule, Error> {
    Ok(schedule.ok_or(weft_proto::ConversionError::MissingField(field))?)
}

impl Client {
    /// Creates a cron schedule (scope `submit`). A bad expression, zone or
    /// task is [`Error::InvalidArgument`] naming the field; a name in use
    /// is [`Error::FailedPrecondition`] (ALREADY_EXISTS on the wire).
    pub async fn create_schedule(&self, spec: pb::ScheduleSpec) -> Result<pb::Schedule, Error> {
        let mut client = self.schedules.clone();
        let answer =
            unary(client.create_schedule(request(pb::CreateScheduleRequest { spec: Some(spec) })))
                .await?;
        schedule_from(answer.schedule, "CreateScheduleResponse.schedule")
    }

    /// Every schedule, by name (scope `read`).
    pub async fn list_schedules(&self) -> Result<Vec<pb::Schedule>, Error> {
        let mut client = self.schedules.clone();
        Ok(
            unary(client.list_schedules(request(pb::ListSchedulesRequest {})))
                .await?
                .schedules,
        )
    }

    /// Pauses (`true`) or resumes a schedule (scope `submit`); a resumed
    /// one does not catch up what passed while paused.
    pub async fn pause_schedule(&self, name: &str, paused: bool) -> Result<pb::Schedule, Error> {
        let mut client = self.schedules.clone();
        let answer = unary(client.pause_schedule(request(pb::PauseScheduleRequest {
            name: name.to_owned(),
            paused,
        })))
        .await?;
        schedule_from(answer.schedule, "PauseScheduleResponse.schedule")
    }

    /// Deletes a schedule (scope `submit`); the tasks it fired are kept.
    pub async fn delete_schedule(&self, name: &str) -> Result<(), Error> {
        let mut client = self.schedules.clone();
        unary(client.delete_schedule(request(pb::DeleteScheduleRequest {
            name: name.to_owned(),
        })))
        .await?;
        Ok(())
    }
}
