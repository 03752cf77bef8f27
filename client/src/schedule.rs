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

    /// Every schedule, by name (scope `read`): the coordinator answers a
    /// page at a time (see [`Client::list_schedules_page`]), and this
    /// follows the pages to the last.
    pub async fn list_schedules(&self) -> Result<Vec<pb::Schedule>, Error> {
        let mut schedules = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self.list_schedules_page(&page_token, 0).await?;
            schedules.extend(page.schedules);
            if page.next_page_token.is_empty() {
                return Ok(schedules);
            }
            // Tokens are names, each page's after the one before: one that
            // does not move on would page forever.
            if page.next_page_token <= page_token {
                return Err(weft_proto::ConversionError::Invalid {
                    field: "ListSchedulesResponse.next_page_token",
                    reason: format!("{:?} does not follow {page_token:?}", page.next_page_token),
                }
                .into());
            }
            page_token = page.next_page_token;
        }
    }

    /// One page of schedules by name (scope `read`): those after the one
    /// named `page_token` (empty: from the first), at most `limit` (0: as
    /// many as the coordinator's page holds, about 1 MiB). Its
    /// `next_page_token` is the next call's `page_token`, empty after the
    /// last page. A token that is not a schedule name is
    /// [`Error::InvalidArgument`].
    pub async fn list_schedules_page(
        &self,
        page_token: &str,
        limit: u32,
    ) -> Result<pb::ListSchedulesResponse, Error> {
        let mut client = self.schedules.clone();
        unary(client.list_schedules(request(pb::ListSchedulesRequest {
            page_token: page_token.to_owned(),
            limit,
        })))
        .await
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
