"""Listing schedules past one ``ListSchedules`` page: the clients follow the pages.

Each schedule's task is near the 64 KiB cap, so a handful take more than one of the
coordinator's 1 MiB pages. Needs the binaries, as ``test_e2e``.
"""

from __future__ import annotations

import asyncio

import pytest

import weft
import weft.aio
from weft._proto import schedule_pb2

from test_e2e import Cluster

#: Near the 64 KiB cap: about 17 schedules to a page.
INPUT = b"x" * (60 * 1024)
NAMES = [f"big-{i:02}" for i in range(40)]


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    for name in reversed(NAMES):  # created out of name order: listed by name
        c.client.create_schedule(name, "0 0 1 1 *", weft.call_spec("echo", INPUT))
    yield c
    c.client.close()


def test_list_schedules_follows_the_pages(cluster):
    client = cluster.client
    pages = []
    list_page = client._schedules.ListSchedules

    def spy(request, **kwargs):
        response = list_page(request, **kwargs)
        pages.append((request.page_token, [s.spec.name for s in response.schedules], response.next_page_token))
        return response

    client._schedules.ListSchedules = spy
    try:
        assert [s.name for s in client.list_schedules()] == NAMES
    finally:
        client._schedules.ListSchedules = list_page
    assert len(pages) >= 3, pages
    assert pages[0][0] == "" and pages[-1][2] == ""
    for (_, names, next_token), (token, _, _) in zip(pages, pages[1:]):
        assert next_token == names[-1] == token, "each page resumes after the last one's last name"


def test_the_asyncio_client_lists_every_schedule(cluster):
    async def body() -> None:
        async with weft.aio.Client(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as client:
            assert [s.name for s in await client.list_schedules()] == NAMES

    asyncio.run(body())


def test_a_page_token_that_is_not_a_name_is_invalid(cluster):
    with pytest.raises(weft.InvalidArgument, match="page_token"):
        cluster.client._unary(
            cluster.client._schedules.ListSchedules, schedule_pb2.ListSchedulesRequest(page_token="not a name")
        )
