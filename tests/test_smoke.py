from tests.support import request, stream_request, unique


async def test_create_then_get(service, nc):
    name = unique()
    r = await request(nc, "ms.trigger.create.stream", stream_request(name, "a.b", "c.d"))
    assert r.status == 201, r.envelope
    g = await request(nc, f"ms.trigger.get.stream.{name}")
    assert g.status == 200, g.envelope
    print(r.envelope, g.envelope)
