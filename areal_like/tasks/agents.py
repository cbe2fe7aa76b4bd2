"""Shipped agents (``task.agent``): the calculator task written with the ``openai`` SDK
(``calc_agent``, knowing nothing of this project) and with LangGraph (``langgraph_calc_agent``).
Their conversations render as the ``calc`` environment's, so its demos warm-start the model.
"""

from __future__ import annotations

import json

from areal_like.tasks.envs import CALC_TOOL, Calculator, calc

CALC_SPEC = {"type": "function", "function": {k: CALC_TOOL[k] for k in ("name", "description",
                                                                       "parameters")}}
MAX_CALLS = 3  # the model's turns, as the calc environment's task.max_turns


async def calc_agent(client_base_url: str, api_key: str, example) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=client_base_url, api_key=api_key, max_retries=0)
    messages: list = [{"role": "user", "content": example.prompt}]
    try:
        for _ in range(MAX_CALLS):
            reply = (await client.chat.completions.create(
                model="policy", messages=messages, tools=[CALC_SPEC])).choices[0].message
            messages.append(reply)
            if not reply.tool_calls:
                return 1.0 if (reply.content or "").strip() == example.answer else 0.0
            for call in reply.tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": _run_tool(call.function.name, call.function.arguments)})
        return 0.0
    finally:
        await client.close()


def _run_tool(name: str, arguments: str) -> str:
    """The tool's result, or the error the model reads (a bad call must not end the episode)."""
    try:
        args = json.loads(arguments)
        if name != "calc" or not isinstance(args, dict) or set(args) != {"e"}:
            raise ValueError(f"unknown tool or arguments: {name}({arguments})")
        return calc(str(args["e"]))
    except Exception as e:  # noqa: BLE001 - the model reads what went wrong
        return f"error: {e}"


calc_agent.demo = Calculator.demo  # launch/warmstart.py: conversations that solve an example
calc_agent.tools = [CALC_TOOL]


async def langgraph_calc_agent(client_base_url: str, api_key: str, example) -> float:
    """``calc_agent`` as a LangGraph graph of a model node and a tool node (the
    ``agent-langgraph`` extra), with the same tool spec."""
    from langchain_openai import ChatOpenAI
    from langgraph.errors import GraphRecursionError
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    model = ChatOpenAI(model="policy", base_url=client_base_url, api_key=api_key,
                       max_retries=0).bind_tools([CALC_SPEC])

    async def think(state: MessagesState) -> dict:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", think)
    graph.add_node("tools", ToolNode([_langchain_calc()], handle_tool_errors=True))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    try:  # each model turn and each tool turn is one step of the graph
        state = await graph.compile().ainvoke({"messages": [("user", example.prompt)]},
                                              {"recursion_limit": 2 * MAX_CALLS})
    except GraphRecursionError:
        return 0.0
    return 1.0 if str(state["messages"][-1].content).strip() == example.answer else 0.0


def _langchain_calc():
    """The calc tool as LangChain's tool object (LangGraph's ToolNode runs it)."""
    from langchain_core.tools import StructuredTool

    return StructuredTool.from_function(lambda e: _run_tool("calc", json.dumps({"e": e})),
                                        name="calc", description=CALC_TOOL["description"])


langgraph_calc_agent.demo = Calculator.demo
langgraph_calc_agent.tools = [CALC_TOOL]
