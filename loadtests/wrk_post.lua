-- wrk: send every request as a POST with an empty JSON body (loadtests/bench.py)
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
