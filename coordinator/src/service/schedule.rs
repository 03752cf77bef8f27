//! `ScheduleService`: cron schedules. Create, pause and delete need the
//! `submit` scope (a schedule submits tasks); list needs `read`. Specs are
//! checked here (cron, zone, task as Submit checks one) and the rest is the
//! scheduler's (`scheduler::cron`), through the driver. A name to pause
//! or delete is checked as a name first (INVALID_ARGUMENT, cut, for one no
//! schedule could have). List answers a page
//! at a time (`cron::LIST_PAGE_BYTES`), its token the page's last name.

use tonic::{Request, Response, Status};

use weft_proto::pb;

use crate::auth::{self, Scope};
use crate::driver::{Command, Handle};
use crate::error::Error;
use crate::scheduler::cron::{self, ParsedSchedule};

/// The service; holds the driver's handle.
pub(crate) struct ScheduleApi {
    pub handle: Handle,
}

#[tonic::async_trait]
impl pb::schedule_service_server::ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::CreateScheduleResponse>, Status> {
        auth::require(&request, Scope::Submit)?;
        auth::require_for_specs(
            &request,
            request
                .get_ref()
                .spec
                .iter()
                .filter_map(|s| s.task.as_ref()),
        )?;
        let spec = request.into_inner().spec.ok_or(Error::InvalidArgument(
            weft_proto::ConversionError::MissingField("spec"),
        ))?;
        let limits = self.handle.config.spec_limits();
        let parsed = Box::new(ParsedSchedule::parse(spec, Some(&limits))?);
        let schedule = self
            .handle
            .call(|reply| Command::CreateSchedule { parsed, reply })
            .await??;
        Ok(Response::new(pb::CreateScheduleResponse {
            schedule: Some(schedule),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        auth::require(&request, Scope::Read)?;
        let pb::ListSchedulesRequest { page_token, limit } = request.into_inner();
        // The token is the last name of the page before: checked as a name,
        // so a garbled one is refused rather than read as "from there on".
        let after = match page_token.as_str() {
            "" => None,
            _ => {
                cron::check_name("page_token", &page_token)?;
                Some(page_token)
            }
        };
        let limit = match limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let page = self
            .handle
            .call(|reply| Command::ListSchedules {
                after,
                limit,
                reply,
            })
            .await?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: page.schedules,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::PauseScheduleResponse>, Status> {
        auth::require(&request, Scope::Submit)?;
        let pb::PauseScheduleRequest { name, paused } = request.into_inner();
        // A name no schedule can have is refused as such, not looked up.
        cron::check_name("name", &name)?;
        let schedule = self
            .handle
            .call(|reply| Command::PauseSchedule {
                name,
                paused,
                reply,
            })
            .await??;
        Ok(Response::new(pb::PauseScheduleResponse {
            schedule: Some(schedule),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        auth::require(&request, Scope::Submit)?;
        let name = request.into_inner().name;
        cron::check_name("name", &name)?;
        self.handle
            .call(|reply| Command::DeleteSchedule { name, reply })
            .await??;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }
}
