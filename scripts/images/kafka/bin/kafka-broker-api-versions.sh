#!/usr/bin/env bash
# kafka-broker-api-versions.sh of the image scripts/docker makes: Kafka's
# BrokerApiVersionsCommand, as in Kafka's distribution.
exec java -Xmx128m -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties \
  -cp '/opt/kafka/libs/*' org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
